"""OpenAI-compatible HTTP server: one base model, many adapters, mixed-adapter batches.

`model` in a request selects an adapter by name (or the base model by its name); the engine
(engine.py, scheduler.py) decodes every running request in one batch, step by step. Endpoints: GET /health,
GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events); the adapter routes and GET /metrics are in admin_routes.py, the browser playground at / and
its read-only routes in playground.py. With an API key every endpoint but /health needs
`Authorization: Bearer <key>` (auth.py). Errors are OpenAI-style JSON: {"error": {"message", "type", "code"}};
the engine's own refusals (errors.py) become 400 / 403 / 404 / 409 here.
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
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # an optional dependency: say how to get it
    raise ImportError(f"lorakit serve needs fastapi and uvicorn ({e.name} is missing): "
                      "pip install 'lorakit[serve]'") from e

from ..chat import render_prompt
from .admin_routes import add_adapter_routes
from .auth import add_auth
from .engine import Engine, Job, ServeConfig
from .errors import EngineError
from .http_util import APIError, error_response, read_json
from .playground import add_playground_routes
from .request import Params, request_params
from .sampling import cut_at_stop

__all__ = ["APIError", "create_app", "serve"]

def create_app(engine: Engine, extensions=()) -> FastAPI:
    """The app; each of `extensions` is called as extension(app, engine) to add its routes (lorakit serve adds the
    Train view's, studio/routes.py) and may return an object with shutdown(), called when the server stops."""
    # No /docs or /redoc: FastAPI's pages load their assets from an internet CDN (blank offline); the API is
    # OpenAI's, documented in docs/reference/http-api.md. /openapi.json stays.
    app = FastAPI(title="lorakit", version="0.1.0", docs_url=None, redoc_url=None)
    add_auth(app, engine.config.api_key, engine.config.admin_api_key)
    _add_error_handlers(app)
    _add_completion_routes(app, engine)
    add_adapter_routes(app, engine)
    if engine.config.playground:
        add_playground_routes(app, engine, engine.config.runs_dir)
    app.state.closers = [c for c in (extension(app, engine) for extension in extensions) if c is not None]
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e)

    @app.exception_handler(EngineError)
    async def _engine_error(_, e: EngineError):
        return error_response(APIError.from_engine(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):  # unknown routes, wrong methods
        codes = {404: "unknown_route", 405: "method_not_allowed"}
        message = (f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/completions, "
                   "POST /v1/chat/completions, POST /v1/adapters, DELETE /v1/adapters/{name}"
                   if e.status_code in (404, 405) else str(e.detail))
        return error_response(APIError(e.status_code, message, codes.get(e.status_code, "http_error")))

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):  # a bug: still an OpenAI-style answer, and the server keeps going
        return error_response(APIError(500, f"internal error ({type(e).__name__}: {e})", "internal_error",
                                       "server_error"))


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
    body = await read_json(engine, request)
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
        while not isinstance(item, Exception) and not item[1] and not job.out.empty():
            item = job.out.get_nowait()  # tokens that queued up while the client was slow: one event
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


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, extensions=()) -> None:
    check_port_free(host, port)
    if not config.api_key:
        local = host in ("127.0.0.1", "localhost", "::1")
        print(f"lorakit serve: no --api-key (or LORAKIT_API_KEY): every endpoint is open to whoever reaches "
              f"{host}:{port}{'' if not local else ' (this machine only)'}", flush=True)
    engine = Engine(config)
    print(f"lorakit serve: {engine.base_name} + adapters {engine.adapter_names()} on http://{host}:{port}", flush=True)
    if config.playground:
        runs = f"; runs from {config.runs_dir}" if config.runs_dir else ""
        print(f"playground: open http://{host}:{port}/ in a browser{runs}", flush=True)
    if config.allow_training:
        print(f"training: on (--allow-training); data from {config.training_data_root}", flush=True)
    app = create_app(engine, extensions)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:  # e.g. a training run in progress checkpoints and stops (a restarted server offers to resume it)
        for closer in app.state.closers:
            closer.shutdown()
