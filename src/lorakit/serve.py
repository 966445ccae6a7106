"""OpenAI-compatible HTTP server: one base model, many adapters, mixed-adapter batches.

`model` in a request selects an adapter by name (or the base model by its name). Requests that
arrive together are decoded together in one batch (each row with its own adapter, see multi.py):
a worker thread collects up to `max_batch_size` requests, waiting at most `max_wait_ms` for more.
Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events), POST /v1/adapters (load from under --adapter-root only),
DELETE /v1/adapters/{name}. Errors are OpenAI-style JSON: {"error": {"message", "type", "code"}}.
"""


import asyncio
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from .data import render_prompt


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind


@dataclass
class ServeConfig:
    model: str = "smollm2-135m"
    adapters: dict[str, str] = field(default_factory=dict)
    adapter_root: str | None = None
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_tokens_cap: int = 512
    max_prompt_tokens: int = 2048
    max_body_bytes: int = 1 << 20


@dataclass
class Job:
    ids: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    generated: list[int] = field(default_factory=list)


class Engine:
    """The model, its adapters, and the batching worker thread."""

    def __init__(self, config: ServeConfig, model=None, tokenizer=None):
        from .models import load_model, load_tokenizer

        self.config = config
        self.base_name = os.path.basename(str(config.model).rstrip("/")) or "base"
        self.tokenizer = tokenizer or load_tokenizer(config.model)
        self.model = model if model is not None else load_model(config.model)
        self.lock = threading.Lock()
        self.jobs: queue.Queue[Job] = queue.Queue()
        for name, path in config.adapters.items():
            self.load_adapter(name, path, check_root=False)
        threading.Thread(target=self._worker, daemon=True).start()

    # --- adapters --------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return sorted(getattr(self.model, "peft_config", {}))

    def load_adapter(self, name: str, path: str, check_root: bool = True) -> None:
        from .config import LoraConfig
        from .model import LoraModel

        if not name or name == self.base_name or "/" in name:
            raise APIError(400, f"invalid adapter name {name!r}", "invalid_name")
        if name in self.adapter_names():
            raise APIError(409, f"adapter {name!r} is already loaded", "adapter_exists")
        if check_root:
            path = self._under_root(path)
        if not os.path.isdir(path):
            raise APIError(404, f"adapter directory {path!r} not found", "adapter_not_found")
        try:
            dora = LoraConfig.from_pretrained(path).use_dora
        except (ValueError, OSError) as e:
            raise APIError(400, f"cannot load adapter {name!r}: {e}", "bad_adapter") from None
        if dora:  # its weight norm is per adapter: it cannot share a batch with other rows
            raise APIError(400, f"adapter {name!r} is a DoRA adapter, which cannot join mixed-adapter batches; "
                           "serve its merged model instead (lorakit export --format hf)", "unsupported_adapter")
        with self.lock:
            try:
                if isinstance(self.model, LoraModel):
                    self.model.load_adapter(path, adapter_name=name)
                else:
                    self.model = LoraModel.from_pretrained(self.model, path, adapter_name=name)
            except (ValueError, OSError) as e:
                raise APIError(400, f"cannot load adapter {name!r}: {e}", "bad_adapter") from None

    def _under_root(self, path: str) -> str:
        root = self.config.adapter_root
        if not root:
            raise APIError(403, "loading adapters at runtime is disabled (start the server with --adapter-root)",
                           "adapter_loading_disabled", "permission_error")
        real_root = os.path.realpath(root)
        real = os.path.realpath(os.path.join(real_root, path))
        if os.path.commonpath([real, real_root]) != real_root:
            raise APIError(403, f"adapter path {path!r} is outside the adapter root", "path_outside_root",
                           "permission_error")
        return real

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapter_names():
            raise APIError(404, f"adapter {name!r} is not loaded", "adapter_not_found")
        with self.lock:
            self.model.delete_adapter(name)

    def resolve(self, model_name: str | None) -> str | None:
        if model_name in (None, "", self.base_name):
            return None
        if model_name not in self.adapter_names():
            raise APIError(404, f"model {model_name!r} not found; available: {[self.base_name, *self.adapter_names()]}",
                           "model_not_found")
        return model_name

    # --- generation ------------------------------------------------------------------------
    def submit(self, ids: list[int], adapter: str | None, max_tokens: int, temperature: float) -> Job:
        if len(ids) > self.config.max_prompt_tokens:
            raise APIError(400, f"prompt has {len(ids)} tokens; the limit is {self.config.max_prompt_tokens}",
                           "prompt_too_long")
        job = Job(ids, adapter, max_tokens, temperature, asyncio.get_running_loop(), asyncio.Queue())
        self.jobs.put(job)
        return job

    def _worker(self) -> None:
        while True:
            batch = [self.jobs.get()]
            deadline = time.perf_counter() + self.config.max_wait_ms / 1000
            while len(batch) < self.config.max_batch_size:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            try:
                with self.lock, torch.inference_mode():
                    self._decode(batch)
            except Exception as e:  # a failed batch fails its requests, never the server
                for job in batch:
                    job.loop.call_soon_threadsafe(job.out.put_nowait, e)

    def _decode(self, batch: list[Job]) -> None:
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        width = max(len(j.ids) for j in batch)
        ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in batch])
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in batch])
        names = [j.adapter for j in batch]
        kwargs = {"adapter_names": names} if self.adapter_names() else {}
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        done = [False] * len(batch)
        for _ in range(max(j.max_tokens for j in batch)):
            logits = out.logits[:, -1].float()
            next_ids = []
            for i, job in enumerate(batch):
                token = _pick(logits[i], job.temperature)
                next_ids.append(token)
                if done[i]:
                    continue
                job.generated.append(token)
                finished = token == eos or len(job.generated) >= job.max_tokens
                job.loop.call_soon_threadsafe(job.out.put_nowait, (token, finished))
                done[i] = finished
            if all(done):
                return
            mask = torch.cat([mask, torch.ones(len(batch), 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=torch.tensor(next_ids)[:, None], attention_mask=mask, position_ids=positions,
                             past_key_values=out.past_key_values, use_cache=True, **kwargs)


def _pick(logits: torch.Tensor, temperature: float) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(torch.softmax(logits / temperature, -1), 1))


def _int_param(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value:
        raise APIError(400, f"{name} must be an integer >= {low}, got {value!r}", "invalid_" + name)
    return min(value, high)


def _request_params(engine: Engine, body: dict) -> tuple[str | None, int, float, bool]:
    adapter = engine.resolve(body.get("model"))
    max_tokens = _int_param(body, "max_tokens", 128, 1, engine.config.max_tokens_cap)
    temperature = body.get("temperature", 0.0) if body.get("temperature") is not None else 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be a number in [0, 2], got {temperature!r}", "invalid_temperature")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", "invalid_stream")
    return adapter, max_tokens, float(temperature), stream


def create_app(engine: Engine):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="lorakit", version="0.1.0")

    def error(e: APIError) -> JSONResponse:
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": None, "code": e.code}},
                            status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error(e)

    async def read_json(request: Request) -> dict:
        limit = engine.config.max_body_bytes
        too_large = APIError(413, f"request body exceeds {limit} bytes", "body_too_large")
        if int(request.headers.get("content-length") or 0) > limit:  # refuse before reading it
            raise too_large
        raw = await request.body()
        if len(raw) > limit:  # no or false Content-Length
            raise too_large
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as e:
            raise APIError(400, f"request body is not valid JSON: {e.msg}", "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", "invalid_json")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "adapters": engine.adapter_names()}

    @app.get("/v1/models")
    async def models():
        ids = [engine.base_name, *engine.adapter_names()]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "lorakit"}
                                          for i in ids]}

    async def run(request: Request, chat: bool):
        body = await read_json(request)
        adapter, max_tokens, temperature, stream = _request_params(engine, body)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str)
                    and m.get("role") in ("system", "user", "assistant") for m in messages):
                raise APIError(400, "messages must be a non-empty list of {role, content} objects", "invalid_messages")
            text = render_prompt([{"role": m["role"], "content": m["content"]} for m in messages], engine.tokenizer)
        else:
            text = body.get("prompt")
            if not isinstance(text, str) or not text:
                raise APIError(400, "prompt must be a non-empty string", "invalid_prompt")
        ids = engine.tokenizer(text, add_special_tokens=not chat)["input_ids"]
        job = engine.submit(ids, adapter, max_tokens, temperature)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        model_name = body.get("model") or engine.base_name
        created = int(time.time())
        if stream:
            return StreamingResponse(_stream(engine, job, rid, model_name, created, chat),
                                     media_type="text/event-stream")
        finish = "length"
        while True:
            item = await job.out.get()
            if isinstance(item, Exception):
                raise APIError(500, f"generation failed: {item}", "generation_failed", "server_error")
            token, finished = item
            if finished:
                finish = "stop" if token == engine.tokenizer.eos_token_id else "length"
                break
        text = engine.tokenizer.decode(job.generated, skip_special_tokens=True)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(job.generated),
                 "total_tokens": len(ids) + len(job.generated)}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [choice], "usage": usage}
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        body = await read_json(request)
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise APIError(400, "give 'name' and 'path' (relative to the adapter root) as strings", "invalid_adapter")
        await asyncio.get_running_loop().run_in_executor(None, engine.load_adapter, name, path)
        return {"id": name, "object": "model", "owned_by": "lorakit"}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        await asyncio.get_running_loop().run_in_executor(None, engine.delete_adapter, name)
        return {"id": name, "object": "model", "deleted": True}

    return app


async def _stream(engine: Engine, job: Job, rid: str, model_name: str, created: int, chat: bool):
    sent = ""
    kind = "chat.completion.chunk" if chat else "text_completion"
    if chat:
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': model_name, 'choices': [first]})}\n\n"
    while True:
        item = await job.out.get()
        if isinstance(item, Exception):
            yield f"data: {json.dumps({'error': {'message': str(item), 'type': 'server_error'}})}\n\n"
            break
        token, finished = item
        text = engine.tokenizer.decode(job.generated, skip_special_tokens=True)
        piece, sent = text[len(sent):], text
        reason = ("stop" if token == engine.tokenizer.eos_token_id else "length") if finished else None
        choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": reason} if chat
                  else {"index": 0, "text": piece, "finish_reason": reason, "logprobs": None})
        yield f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': model_name, 'choices': [choice]})}\n\n"
        if finished:
            break
    yield "data: [DONE]\n\n"


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    engine = Engine(config)
    print(f"lorakit serve: {engine.base_name} + adapters {engine.adapter_names()} on http://{host}:{port}", flush=True)
    uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
