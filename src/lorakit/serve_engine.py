"""The serving engine: one base model, its adapters, and the worker thread that decodes batches.

Requests that arrive together are decoded together (each row with its own adapter, see multi.py):
the worker collects up to `max_batch_size` jobs, waiting at most `max_wait_ms` for more. serve.py is
the HTTP side.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .forms import read_config
from .model import LoraModel
from .model_loading import load_model, load_tokenizer


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind


@dataclass
class ServeConfig:
    """Server settings; invalid values raise ValueError naming the setting."""

    model: str = "smollm2-135m"
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter directory, loaded at start
    adapter_root: str | None = None  # POST /v1/adapters loads only from under here (None: disabled)
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_tokens_cap: int = 512
    max_prompt_tokens: int = 2048
    max_body_bytes: int = 1 << 20

    def __post_init__(self):
        for name in ("max_batch_size", "max_tokens_cap", "max_prompt_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) \
                or not 0 <= self.max_wait_ms < float("inf"):
            raise ValueError(f"max_wait_ms must be a number >= 0, got {self.max_wait_ms!r}")
        for name, path in self.adapters.items():
            if not os.path.isdir(path):
                raise FileNotFoundError(f"adapter {name!r}: directory {path} does not exist")


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
        if not name or name == self.base_name or "/" in name:
            raise APIError(400, f"invalid adapter name {name!r}", "invalid_name")
        if name in self.adapter_names():
            raise APIError(409, f"adapter {name!r} is already loaded", "adapter_exists")
        if check_root:
            path = self._under_root(path)
        if not os.path.isdir(path):
            raise APIError(404, f"adapter directory {path!r} not found", "adapter_not_found")
        try:
            dora = read_config(path).use_dora
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
