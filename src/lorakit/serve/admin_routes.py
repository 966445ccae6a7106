"""Admin routes (adapters: load, unload, delete; vLLM's load/unload spellings too) and GET /metrics.
(No `from __future__ import annotations`: FastAPI reads route signatures at runtime.)"""

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from .http_util import APIError, read_json

ADMIN_ROUTES = {("POST", "/v1/adapters"), ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")}
ADMIN_PREFIXES = (("DELETE", "/v1/adapters/"), ("POST", "/v1/runs/"),  # POST /v1/runs/{name}/adapter loads one
                  ("POST", "/v1/train"))  # uploads, previews, probes, starts / stops / resumes training runs


def add_adapter_routes(app: FastAPI, engine) -> None:
    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        body = await read_json(engine, request)
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

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        """vLLM's spelling: {"lora_name", "lora_path"} (the path under --adapter-root); plain-text answer."""
        body = await read_json(engine, request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise APIError(400, "give 'lora_name' and 'lora_path' (under the adapter root) as strings",
                           "invalid_adapter")
        await asyncio.get_running_loop().run_in_executor(None, engine.load_adapter, name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = await read_json(engine, request)
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise APIError(400, "give 'lora_name' as a string", "invalid_adapter")
        await asyncio.get_running_loop().run_in_executor(None, engine.delete_adapter, name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.text(engine), media_type="text/plain; version=0.0.4")
