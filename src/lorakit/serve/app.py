"""OpenAI-compatible HTTP server: one base model, many adapters, mixed-adapter batches.

`model` in a request selects an adapter by name (or the base model by its name); the engine
(engine.py) decodes requests that arrive together in one batch. Endpoints: GET /health,
GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events), POST /v1/adapters (load from under --adapter-root only), DELETE
/v1/adapters/{name}. Errors are OpenAI-style JSON: {"error": {"message", "type", "code"}}; the engine's
own refusals (errors.py) become 400 / 403 / 404 / 409 here. The browser playground at / and its read-only
routes are in playground.py.
(No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.)
"""

import asyncio
import json
import socket
import time
import uuid

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # an optional dependency: say how to get it
    raise ImportError(f"lorakit serve needs fastapi and uvicorn ({e.name} is missing): "
                      "pip install 'lorakit[serve]'") from e

from ..chat import render_prompt
from .engine import Engine, Job, ServeConfig
from .errors import Conflict, EngineError, InvalidRequest, NotAllowed, NotFound
from .playground import add_playground_routes
from .request import Params, request_params
from .sampling import cut_at_stop

__all__ = ["APIError", "create_app", "serve"]

HTTP_STATUS = {InvalidRequest: (400, "invalid_request_error"), NotAllowed: (403, "permission_error"),
               NotFound: (404, "invalid_request_error"), Conflict: (409, "invalid_request_error")}


class APIError(Exception):
    """An HTTP error answer: status, message, OpenAI-style code and type."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind

    @classmethod
    def from_engine(cls, e: EngineError) -> "APIError":
        status, kind = HTTP_STATUS[type(e)]
        return cls(status, e.message, e.code, kind)


def create_app(engine: Engine) -> FastAPI:
    # No /docs or /redoc: FastAPI's pages load their assets from an internet CDN (blank offline); the API is
    # OpenAI's, documented in the README. /openapi.json stays.
    app = FastAPI(title="lorakit", version="0.1.0", docs_url=None, redoc_url=None)
    _add_error_handlers(app)
    _add_completion_routes(app, engine)
    _add_adapter_routes(app, engine)
    if engine.config.playground:
        add_playground_routes(app, engine, engine.config.runs_dir)
    return app


def _error(e: APIError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": None, "code": e.code}},
                        status_code=e.status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e)

    @app.exception_handler(EngineError)
    async def _engine_error(_, e: EngineError):
        return _error(APIError.from_engine(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):  # unknown routes, wrong methods
        codes = {404: "unknown_route", 405: "method_not_allowed"}
        message = (f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/completions, "
                   "POST /v1/chat/completions, POST /v1/adapters, DELETE /v1/adapters/{name}"
                   if e.status_code in (404, 405) else str(e.detail))
        return _error(APIError(e.status_code, message, codes.get(e.status_code, "http_error")))

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):  # a bug: still an OpenAI-style answer, and the server keeps going
        return _error(APIError(500, f"internal error ({type(e).__name__}: {e})", "internal_error", "server_error"))


async def _read_json(engine: Engine, request: Request) -> dict:
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
    except UnicodeDecodeError:
        raise APIError(400, "request body is not UTF-8 text", "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", "invalid_json")
    return body


def _prompt_text(engine: Engine, body: dict, chat: bool) -> str:
    """The text to complete: the chat template applied to `messages`, or `prompt` as it is."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str)
                and m.get("role") in ("system", "user", "assistant") for m in messages):
            raise APIError(400, "messages must be a non-empty list of {role, content} objects", "invalid_messages")
        return render_prompt([{"role": m["role"], "content": m["content"]} for m in messages], engine.tokenizer)
    text = body.get("prompt")
    if not isinstance(text, str) or not text:
        raise APIError(400, "prompt must be a non-empty string", "invalid_prompt")
    return text


async def _complete(engine: Engine, request: Request, chat: bool):
    body = await _read_json(engine, request)
    params = request_params(engine, body)
    ids = engine.tokenizer(_prompt_text(engine, body, chat), add_special_tokens=not chat)["input_ids"]
    job = engine.submit(ids, params.adapter, params.max_tokens, params.sampling, params.ignore_eos)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    model_name = body.get("model") or engine.base_name
    created = int(time.time())
    if params.stream:
        return StreamingResponse(_stream(engine, job, rid, model_name, created, chat, params, len(ids)),
                                 media_type="text/event-stream")
    while True:
        item = await _next_item(job, request)
        if isinstance(item, Exception):
            raise APIError(500, f"generation failed: {item}", "generation_failed", "server_error")
        token, finished = item
        stopped = False
        if params.stops or finished:  # without stop strings the text is decoded once, at the end
            text, stopped = cut_at_stop(engine.tokenizer.decode(job.generated, skip_special_tokens=True),
                                        params.stops, final=finished)
        if stopped or finished:
            job.cancel()  # a stop string ends the answer: no more steps for it
            finish = "stop" if stopped or token == engine.tokenizer.eos_token_id else "length"
            break
    usage = _usage(len(ids), job)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [choice], "usage": usage}
    return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], "usage": usage}


def _add_completion_routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "adapters": engine.adapter_names()}

    @app.get("/v1/models")
    async def models():
        ids = [engine.base_name, *engine.adapter_names()]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "lorakit"}
                                          for i in ids]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(engine, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(engine, request, chat=True)


def _add_adapter_routes(app: FastAPI, engine: Engine) -> None:
    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        body = await _read_json(engine, request)
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise APIError(400, "give 'name' and 'path' (relative to the adapter root) as strings", "invalid_adapter")
        await asyncio.get_running_loop().run_in_executor(None, engine.load_adapter, name, path)
        return {"id": name, "object": "model", "owned_by": "lorakit"}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        """Later requests naming it get 404 at once; requests already accepted finish with it, then it is freed."""
        removed = await asyncio.get_running_loop().run_in_executor(None, engine.delete_adapter, name)
        return {"id": name, "object": "model", "deleted": True, "pending_requests": not removed}


async def _next_item(job: Job, request) -> object:
    """The job's next output; a client that disconnected cancels the job (checked twice a second)."""
    getter = asyncio.ensure_future(job.out.get())
    while True:
        done, _ = await asyncio.wait({getter}, timeout=0.5)
        if done:
            return getter.result()
        if await request.is_disconnected():
            getter.cancel()
            job.cancel()
            raise APIError(499, "client disconnected", "client_disconnected")


def _usage(prompt_tokens: int, job: Job) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": len(job.generated),
            "total_tokens": prompt_tokens + len(job.generated)}


async def _stream(engine: Engine, job: Job, rid: str, model_name: str, created: int, chat: bool, params: Params,
                  prompt_tokens: int):
    try:
        async for chunk in _stream_chunks(engine, job, rid, model_name, created, chat, params, prompt_tokens):
            yield chunk
    finally:  # the client went away (the server closes this generator) or the answer is complete
        job.cancel()


async def _stream_chunks(engine: Engine, job: Job, rid: str, model_name: str, created: int, chat: bool,
                         params: Params, prompt_tokens: int):
    sent = ""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list, **extra) -> str:
        head = {"id": rid, "object": kind, "created": created, "model": model_name, "choices": choices}
        return f"data: {json.dumps({**head, **extra})}\n\n"

    if chat:
        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    while True:
        item = await job.out.get()
        if isinstance(item, Exception):
            yield f"data: {json.dumps({'error': {'message': str(item), 'type': 'server_error'}})}\n\n"
            break
        token, finished = item
        text, stopped = cut_at_stop(engine.tokenizer.decode(job.generated, skip_special_tokens=True), params.stops,
                                    final=finished)
        piece, sent = text[len(sent):], text
        done = finished or stopped
        reason = ("stop" if stopped or token == engine.tokenizer.eos_token_id else "length") if done else None
        choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": reason} if chat
                  else {"index": 0, "text": piece, "finish_reason": reason, "logprobs": None})
        yield event([choice])
        if done:
            job.cancel()
            break
    if params.include_usage:  # OpenAI's last chunk: no choices, the usage
        yield event([], usage=_usage(prompt_tokens, job))
    yield "data: [DONE]\n\n"


def check_port_free(host: str, port: int) -> None:
    """Refuse a busy port before the model loads (and before the URL is printed)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} ({e.strerror}); is another server running there? "
                          "pick another --port") from None


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    check_port_free(host, port)
    engine = Engine(config)
    print(f"lorakit serve: {engine.base_name} + adapters {engine.adapter_names()} on http://{host}:{port}", flush=True)
    if config.playground:
        runs = f"; runs from {config.runs_dir}" if config.runs_dir else ""
        print(f"playground: open http://{host}:{port}/ in a browser{runs}", flush=True)
    uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
