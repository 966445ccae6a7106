"""The browser playground at `/` and the read-only routes it uses besides the OpenAI API.

The page (playground/index.html, app.js, train.js, style.css: no framework, no build step, nothing fetched from the internet)
talks only to public routes: the OpenAI API for chat and compare, /v1/adapters for the adapter list, load and
unload, and these:
  GET  /v1/adapters             loaded adapters with their form, rank, alpha, targets, parameters and bytes
  GET  /v1/adapters/available   adapter directories under --adapter-root (relative paths POST /v1/adapters takes)
  GET  /v1/runs                 training runs under --runs: name, method, last step, status
  GET  /v1/runs/{run}           one run: its config.yaml and every metrics.jsonl record
  POST /v1/runs/{run}/adapter   load a finished run's adapter under the run's name (the --runs directory is the
                                operator's: the same as an adapter root for that run's adapter/)
(No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.)
"""

import asyncio
import json
import os
import re
import time

import yaml
from fastapi import FastAPI
from fastapi.responses import FileResponse

from .adapter_pool import ADAPTER_NAME
from .engine import Engine
from .errors import InvalidRequest, NotAllowed, NotFound

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "playground")
ASSET_TYPES = {"index.html": "text/html", "app.js": "text/javascript", "train.js": "text/javascript",
               "style.css": "text/css"}
LIVE_SECONDS = 120  # a run whose metrics changed this recently, without a final adapter, is shown as training


def available_adapters(root: str | None) -> list[str]:
    """Directories under `root` holding an adapter_config.json, as paths relative to it (sorted)."""
    if not root or not os.path.isdir(root):
        return []
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        if "adapter_config.json" in files:
            found.append(os.path.relpath(directory, root))
    return sorted(found)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (a line being written at this moment is skipped)."""
    records = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


def read_run(runs_dir: str, name: str) -> tuple[dict, dict, list[dict]]:
    """(summary, config, metrics records) of one run, each file read once."""
    directory = os.path.join(runs_dir, name)
    metrics, adapter = os.path.join(directory, "metrics.jsonl"), os.path.join(directory, "adapter",
                                                                                "adapter_config.json")
    records, config = read_metrics(metrics), read_config(directory)
    finished = os.path.isfile(adapter) and os.path.getmtime(adapter) >= os.path.getmtime(metrics) - 1
    live = not finished and time.time() - os.path.getmtime(metrics) < LIVE_SECONDS
    summary = {"id": name, "method": config.get("method", "sft"), "model": config.get("model"),
               "step": max((r.get("step", 0) for r in records), default=0),
               "max_steps": config.get("max_steps") or None,
               "status": "finished" if finished else "training" if live else "stopped", "has_adapter": finished}
    return summary, config, records


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.yaml")
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def list_runs(runs_dir: str | None) -> list[str]:
    """Run directories (those with a metrics.jsonl) directly under `runs_dir`, newest first."""
    if not runs_dir or not os.path.isdir(runs_dir):
        return []
    names = [n for n in os.listdir(runs_dir) if os.path.isfile(os.path.join(runs_dir, n, "metrics.jsonl"))]
    return sorted(names, key=lambda n: -os.path.getmtime(os.path.join(runs_dir, n, "metrics.jsonl")))


def known_run(runs_dir: str | None, name: str) -> str:
    """The directory of run `name`, which must be one of list_runs (no path is ever built from the request)."""
    if not runs_dir:
        raise NotAllowed("no runs directory (start the server with --runs DIR)", "runs_disabled")
    if name not in list_runs(runs_dir):
        raise NotFound(f"run {name!r} not found under the runs directory", "run_not_found")
    return os.path.join(runs_dir, name)


def add_playground_routes(app: FastAPI, engine: Engine, runs_dir: str | None) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(ASSETS, "index.html"), media_type="text/html")

    @app.get("/playground/{asset}", include_in_schema=False)
    async def asset(asset: str):
        if asset not in ASSET_TYPES:
            raise NotFound(f"no playground file {asset!r}", "not_found")
        return FileResponse(os.path.join(ASSETS, asset), media_type=ASSET_TYPES[asset])

    _add_info_routes(app, engine, runs_dir)


def _add_info_routes(app: FastAPI, engine: Engine, runs_dir: str | None) -> None:
    @app.get("/v1/adapters")
    async def adapters():
        return {"object": "list", "base": engine.base_name,
                "data": [engine.details[name] for name in engine.adapter_names() if name in engine.details]}

    @app.get("/v1/adapters/available")
    async def available():
        root = engine.config.adapter_root
        return {"object": "list", "root_enabled": bool(root), "data": available_adapters(root)}

    @app.get("/v1/runs")
    async def runs():
        return {"object": "list", "data": [read_run(runs_dir, name)[0] for name in list_runs(runs_dir)]}

    @app.get("/v1/runs/{name}")
    async def run(name: str):
        known_run(runs_dir, name)
        summary, config, records = read_run(runs_dir, name)
        return {**summary, "config": config, "metrics": records}

    @app.post("/v1/runs/{name}/adapter")
    async def load_run_adapter(name: str):
        directory = known_run(runs_dir, name)
        if not read_run(runs_dir, name)[0]["has_adapter"]:
            raise InvalidRequest(f"run {name!r} has no finished adapter yet", "run_not_finished")
        adapter = re.sub(r"[^A-Za-z0-9_-]", "-", name).lstrip("-_")[:64] or "run"
        if not ADAPTER_NAME.fullmatch(adapter):
            raise InvalidRequest(f"run name {name!r} gives no valid adapter name", "invalid_name")
        await asyncio.get_running_loop().run_in_executor(None, engine.load_adapter, adapter,
                                                         os.path.join(directory, "adapter"), False)
        return {"id": adapter, "object": "model", "owned_by": "lorakit"}
