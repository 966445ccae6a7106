"""The playground's Train view: upload or pick a data file, preview it as the trainer sees it, estimate the run,
start / stop / resume `lorakit train` in a child process (training_jobs.py), follow it live (server-sent events),
download the config it ran with. Every route here answers 403 unless the server runs with `--allow-training`;
data paths are relative to the data root (`--data-root`, default RUNS/data) and never leave it, run names are
plain names under `--runs`.

  GET  /v1/train                      settings the page offers, data files, browser-started runs
  POST /v1/train/uploads?filename=F   the request body saved as DATA_ROOT/uploads/F (413 over --max-upload-mb)
  POST /v1/train/preview              {settings}: the first rows as the trainer sees them + held-out prompts
  POST /v1/train/estimate             {settings, measure}: parameters, adapter bytes, predicted memory (+ probe)
  POST /v1/train/runs                 {name, settings}: queue a run (the data file is read and checked first)
  GET  /v1/train/runs/{name}          its state, metrics records and log
  GET  /v1/train/runs/{name}/events   server-sent events: status, metrics (one per record), log lines, end
  GET  /v1/train/runs/{name}/config.yaml   the config `lorakit train` ran with (download)
  POST /v1/train/runs/{name}/stop | /resume
(No `from __future__ import annotations`: FastAPI reads route signatures at runtime.)
"""

import asyncio
import json
import os
import re

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse

from ..serve.errors import InvalidRequest, NotAllowed
from ..serve.http_util import APIError, read_json
from ..serve.playground import read_metrics
from ..train.estimate import estimate as estimate_run
from ..train.preview import heldout_prompts
from ..train.preview import preview as preview_rows
from ..utils import atomic_path
from .jobs import ACTIVE, LOG_FILE, TrainingJobs
from .settings import DATA_SUFFIXES, OFFERED, confined_path, data_files, run_name, train_config

EVENT_POLL_S = 0.3


def _blocking(function, *args):
    return asyncio.get_running_loop().run_in_executor(None, function, *args)


def _data_error(e: Exception) -> APIError:
    return APIError(400, f"the data file cannot be trained on: {e}", "invalid_data")


class TrainView:
    """What every route needs: the server's settings, the jobs (None: training off), the data root."""

    def __init__(self, engine):
        self.engine, self.config = engine, engine.config
        self.jobs = TrainingJobs(self.config.runs_dir) if self.config.allow_training else None
        self.data_root = self.config.training_data_root
        if self.jobs:
            os.makedirs(self.data_root, exist_ok=True)

    def enabled(self) -> TrainingJobs:
        if self.jobs is None:
            raise NotAllowed("training from the server is off: start it with `lorakit serve --allow-training`",
                             "training_disabled")
        return self.jobs

    async def settings_of(self, request: Request, named: bool = False):
        """(the request body, the run's name: the body's `name` when `named`, the TrainConfig of its `settings`)."""
        self.enabled()
        body = await read_json(self.engine, request)
        name = run_name(body.get("name")) if named else "preview"
        try:
            return body, name, train_config(body.get("settings"), self.config.model, self.data_root,
                                            os.path.join(self.config.runs_dir, name))
        except (ValueError, TypeError) as e:
            raise InvalidRequest(str(e), "invalid_settings") from None


def add_train_routes(app: FastAPI, engine) -> TrainingJobs | None:
    """The Train view's routes (403 each unless engine.config.allow_training); returns the jobs (or None)."""
    view = TrainView(engine)
    _add_data_routes(app, view)
    _add_run_routes(app, view)
    return view.jobs


def _add_data_routes(app: FastAPI, view: TrainView) -> None:
    config, engine = view.config, view.engine

    @app.get("/v1/train")
    async def overview():
        jobs = view.enabled()
        return {"model": engine.base_name, "data_root": view.data_root, "data_files": data_files(view.data_root),
                "upload_limit_bytes": config.max_upload_bytes, "offered": OFFERED,
                "runs": [jobs.describe(n) for n in jobs.names()]}

    @app.post("/v1/train/uploads")
    async def upload(request: Request, filename: str = ""):
        view.enabled()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", filename) or not filename.endswith(DATA_SUFFIXES):
            raise InvalidRequest(f"upload filename {filename!r} must be a plain name (no directory) ending in "
                                 f"{', '.join(DATA_SUFFIXES)}", "invalid_filename")
        body = await _read_upload(request, config.max_upload_bytes)
        if not body:
            raise InvalidRequest(f"upload {filename!r} is empty", "invalid_data")
        await _blocking(_save_upload, view.data_root, filename, body)
        return {"path": f"uploads/{filename}", "bytes": len(body)}

    @app.post("/v1/train/preview")
    async def preview(request: Request):
        _, _, cfg = await view.settings_of(request)
        try:
            shown = await _blocking(preview_rows, cfg, engine.tokenizer)
            prompts = await _blocking(heldout_prompts, cfg, engine.tokenizer)
        except ValueError as e:
            raise _data_error(e) from None
        return {**shown, "heldout_prompts": prompts}

    @app.post("/v1/train/estimate")
    async def estimate(request: Request):
        body, _, cfg = await view.settings_of(request)
        try:
            return await _blocking(estimate_run, cfg, bool(body.get("measure")))
        except RuntimeError as e:
            raise APIError(400, str(e), "probe_failed") from None


def _add_run_routes(app: FastAPI, view: TrainView) -> None:
    @app.post("/v1/train/runs")
    async def start(request: Request):
        _, name, cfg = await view.settings_of(request, named=True)
        try:  # the whole file, read as the run will read it: a bad file fails here, and no run starts
            await _blocking(preview_rows, cfg, view.engine.tokenizer, 0)
        except ValueError as e:
            raise _data_error(e) from None
        return await _blocking(view.jobs.submit, name, cfg)

    @app.get("/v1/train/runs/{name}")
    async def run(name: str):
        runs = view.enabled()
        state = runs.describe(run_name(name))
        return {**state, "metrics": read_metrics(os.path.join(runs.directory(name), "metrics.jsonl")),
                "log": _read_log(runs.directory(name)).decode("utf-8", "replace")}

    @app.get("/v1/train/runs/{name}/config.yaml")
    async def run_config(name: str):
        runs = view.enabled()
        runs.describe(run_name(name))
        path = os.path.join(runs.directory(name), "config.yaml")
        if not os.path.isfile(path):
            raise InvalidRequest(f"run {name!r} has not started yet: its config.yaml is written at its start",
                                 "run_not_started")
        return FileResponse(path, media_type="application/yaml", filename=f"{name}.yaml")

    @app.post("/v1/train/runs/{name}/stop")
    async def stop(name: str):
        return await _blocking(view.enabled().stop, run_name(name))

    @app.post("/v1/train/runs/{name}/resume")
    async def resume(name: str):
        return await _blocking(view.enabled().resume, run_name(name))

    @app.get("/v1/train/runs/{name}/events")
    async def events(name: str, request: Request):
        runs = view.enabled()
        runs.describe(run_name(name))
        return StreamingResponse(_events(runs, name, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


async def _read_upload(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is over `limit` bytes: by its Content-Length, or counted."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"upload of {int(declared)} bytes is over the limit of {limit} bytes "
                            "(lorakit serve --max-upload-mb)", "upload_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"upload is over the limit of {limit} bytes (lorakit serve --max-upload-mb)",
                           "upload_too_large")
    return bytes(body)


def _save_upload(data_root: str, name: str, data: bytes) -> None:
    """DATA_ROOT/uploads/NAME, written whole (a temp file renamed into place)."""
    os.makedirs(os.path.join(data_root, "uploads"), exist_ok=True)
    with atomic_path(confined_path(data_root, f"uploads/{name}", must_exist=False)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def _read_log(directory: str, start: int = 0) -> bytes:
    try:
        with open(os.path.join(directory, LOG_FILE), "rb") as f:
            f.seek(start)
            return f.read()
    except OSError:
        return b""


def _status(state: dict, records: list[dict]) -> dict:
    """The state plus step, tokens/s and ETA from the latest step records."""
    steps = [r for r in records if "train_loss" in r]
    out = {"status": state.get("status"), "resumable": state.get("resumable"), "max_steps": state.get("max_steps"),
           "step": steps[-1]["step"] if steps else 0}
    if steps:
        last = steps[-1]
        earlier = steps[-2] if len(steps) > 1 and steps[-2]["elapsed_s"] < last["elapsed_s"] else None
        per_step = last["elapsed_s"] - earlier["elapsed_s"] if earlier else last["elapsed_s"]
        out["tokens_per_s"] = last.get("tokens_per_s")
        if out["max_steps"]:
            out["eta_s"] = max(0, out["max_steps"] - last["step"]) * per_step
    return out


async def _events(runs: TrainingJobs, name: str, request: Request):
    """Every metrics record once (by step; a resumed run's rewritten file sends only the new steps), new log
    text, and the status whenever it changes; `end` when the run is no longer queued or training."""
    directory = runs.directory(name)
    metrics, sent_step, log_at, last = os.path.join(directory, "metrics.jsonl"), -1, 0, None
    while not await request.is_disconnected():
        records = read_metrics(metrics)
        for record in records:
            if "step" in record and record["step"] > sent_step:
                sent_step = record["step"]
                yield f"event: metrics\ndata: {json.dumps(record)}\n\n"
        text = _read_log(directory, log_at)
        text = text[:text.rfind(b"\n") + 1]  # whole lines only (a line being written comes next time)
        if text:
            log_at += len(text)
            yield f"event: log\ndata: {json.dumps(text.decode('utf-8', 'replace'))}\n\n"
        status = _status(runs.describe(name), records)
        if status != last:
            last = status
            yield f"event: status\ndata: {json.dumps(status)}\n\n"
        if status["status"] not in ACTIVE:
            yield "event: end\ndata: {}\n\n"
            return
        await asyncio.sleep(EVENT_POLL_S)
