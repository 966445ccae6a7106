"""The serving engine: one base model, its adapters, and the worker thread that decodes batches.

Requests that arrive together are decoded together (each row with its own adapter, see layers/mixed_batch.py):
the worker collects up to `max_batch_size` jobs, waiting at most `max_wait_ms` for more. serve.py is
the HTTP side.

Adapter lifecycle: a request holds its adapter from submission until it finishes. Deleting an adapter
hides it at once (later requests get 404, a new adapter cannot take its name yet) and removes it when its
last request finishes, so no request fails or runs under another adapter. A cancelled job (its client
disconnected) stops decoding at the next step; a batch whose rows are all done or cancelled ends there.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field

import torch

from ..adapters.model import LoraModel
from ..hardware import check_device_setting, check_dtype_setting, resolve_device_type, resolve_dtype
from ..models.loading import load_model, load_tokenizer
from ..utils import check_positive_int
from ..variants.registry import read_config
from .errors import Conflict, InvalidRequest, NotAllowed, NotFound
from .sampling import Sampling

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a module-dict key: no '.', no '/'


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
    dtype: str = "auto"   # base model dtype: auto (bf16 where fast), bf16, fp16, fp32
    device: str = "auto"  # auto (the GPU when visible), cpu, cuda
    playground: bool = True        # the browser page at / (serve/playground.py)
    runs_dir: str | None = None    # training runs the page shows (GET /v1/runs); None: none

    def __post_init__(self):
        for name in ("max_batch_size", "max_tokens_cap", "max_prompt_tokens", "max_body_bytes"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) \
                or not 0 <= self.max_wait_ms < float("inf"):
            raise ValueError(f"max_wait_ms must be a number >= 0, got {self.max_wait_ms!r}")
        check_dtype_setting(self.dtype)
        check_device_setting(self.device)
        if self.runs_dir is not None and not os.path.isdir(self.runs_dir):
            raise FileNotFoundError(f"runs directory {self.runs_dir} does not exist")
        for name, path in self.adapters.items():
            if not os.path.isdir(path):
                raise FileNotFoundError(f"adapter {name!r}: directory {path} does not exist")


@dataclass
class Job:
    ids: list[int]
    adapter: str | None
    max_tokens: int
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    generated: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # decode max_tokens tokens even past end-of-text (vLLM's option)
    cancelled: bool = False  # set from the HTTP side when the client is gone

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """The model, its adapters, and the batching worker thread."""

    def __init__(self, config: ServeConfig, model=None, tokenizer=None):
        self.config = config
        self.base_name = os.path.basename(str(config.model).rstrip("/")) or "base"
        self.tokenizer = tokenizer or load_tokenizer(config.model)
        device_type = resolve_device_type(config.device)
        self.model = model if model is not None else load_model(
            config.model, dtype=resolve_dtype(config.dtype, device_type), device=device_type)
        self.device = next(self.model.parameters()).device
        self.lock = threading.Lock()       # the model: decoding, loading, deleting
        self.registry = threading.Lock()   # in_use / deleting (never held while waiting for `lock`)
        self.in_use: dict[str, int] = {}   # adapter -> requests submitted and not finished
        self.deleting: set[str] = set()    # deleted by a client, removed when its last request finishes
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.details: dict[str, dict] = {}  # adapter -> what GET /v1/adapters shows (recorded when loaded)
        for name, path in config.adapters.items():
            self.load_adapter(name, path, check_root=False)
        threading.Thread(target=self._worker, daemon=True).start()

    # --- adapters --------------------------------------------------------------------------
    def _loaded(self) -> list[str]:
        return sorted(getattr(self.model, "peft_config", {}))

    def adapter_names(self) -> list[str]:
        """The adapters requests may name (loaded and not being deleted)."""
        return [n for n in self._loaded() if n not in self.deleting]

    def load_adapter(self, name: str, path: str, check_root: bool = True) -> None:
        if not ADAPTER_NAME.fullmatch(name) or name == self.base_name:
            raise InvalidRequest(f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-' (starting "
                                 f"with a letter or digit), other than the base model's name {self.base_name!r}",
                                 "invalid_name")
        if "\x00" in path:
            raise InvalidRequest("adapter path must not contain a NUL character", "invalid_path")
        if name in self.deleting:
            raise Conflict(f"adapter {name!r} is being deleted (requests still use it); retry shortly",
                           "adapter_being_deleted")
        if name in self._loaded():
            raise Conflict(f"adapter {name!r} is already loaded", "adapter_exists")
        if check_root:
            path = self._under_root(path)
        if not os.path.isdir(path):
            raise NotFound(f"adapter directory {path!r} not found", "adapter_not_found")
        try:
            dora = read_config(path).use_dora
        except (ValueError, OSError) as e:
            raise InvalidRequest(f"cannot load adapter {name!r}: {e}", "bad_adapter") from None
        if dora:  # its weight norm is per adapter: it cannot share a batch with other rows
            raise InvalidRequest(f"adapter {name!r} is a DoRA adapter, which cannot join mixed-adapter batches; "
                                 "serve its merged model instead (lorakit export --format hf)", "unsupported_adapter")
        with self.lock:
            try:
                if isinstance(self.model, LoraModel):
                    self.model.load_adapter(path, adapter_name=name)
                else:
                    self.model = LoraModel.from_pretrained(self.model, path, adapter_name=name)
            except (ValueError, OSError) as e:
                raise InvalidRequest(f"cannot load adapter {name!r}: {e}", "bad_adapter") from None
            self.details[name] = self._describe(name, path)

    def _describe(self, name: str, path: str) -> dict:
        """Form, rank, alpha, targets, parameter count and bytes of a loaded adapter (the caller holds `lock`)."""
        config = self.model.peft_config[name]
        tensors = [p for n, p in self.model.named_parameters() if f".{name}." in n]
        targets = config.target_modules
        return {"id": name, "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
                "r": getattr(config, "r", None), "lora_alpha": getattr(config, "lora_alpha", None),
                "target_modules": sorted(targets) if isinstance(targets, (list, set, tuple)) else targets,
                "parameters": sum(p.numel() for p in tensors),
                "bytes": sum(p.numel() * p.element_size() for p in tensors), "source": path}

    def _under_root(self, path: str) -> str:
        root = self.config.adapter_root
        if not root:
            raise NotAllowed("loading adapters at runtime is disabled (start the server with --adapter-root)",
                             "adapter_loading_disabled")
        real_root = os.path.realpath(root)
        real = os.path.realpath(os.path.join(real_root, path))
        if os.path.commonpath([real, real_root]) != real_root:
            raise NotAllowed(f"adapter path {path!r} is outside the adapter root", "path_outside_root")
        return real

    def delete_adapter(self, name: str) -> bool:
        """Hide adapter `name` now; remove it now if no request uses it, else when the last one finishes.
        Returns True when it was removed now."""
        with self.registry:
            if name not in self.adapter_names():
                raise NotFound(f"adapter {name!r} is not loaded", "adapter_not_found")
            self.deleting.add(name)
            now = not self.in_use.get(name)
        if now:
            with self.lock:
                self._remove(name)
        return now

    def _remove(self, name: str) -> None:
        """Delete a hidden adapter from the model (the caller holds `lock`)."""
        self.model.delete_adapter(name)
        self.details.pop(name, None)
        with self.registry:
            self.deleting.discard(name)

    def _release(self, jobs: list[Job]) -> None:
        """The jobs are finished: drop their hold on their adapters, removing deleted ones no request
        uses any more (the caller holds `lock`)."""
        to_remove = []
        with self.registry:
            for job in jobs:
                if job.adapter is not None:
                    self.in_use[job.adapter] -= 1
                    if not self.in_use[job.adapter]:
                        del self.in_use[job.adapter]
                        if job.adapter in self.deleting:
                            to_remove.append(job.adapter)
        for name in to_remove:
            self._remove(name)

    def resolve(self, model_name: str | None) -> str | None:
        if model_name in (None, "", self.base_name):
            return None
        if model_name not in self.adapter_names():
            raise NotFound(f"model {model_name!r} not found; available: {[self.base_name, *self.adapter_names()]}",
                           "model_not_found")
        return model_name

    # --- generation ------------------------------------------------------------------------
    def submit(self, ids: list[int], adapter: str | None, max_tokens: int, sampling: Sampling | float = 0.0,
               ignore_eos: bool = False) -> Job:
        """Queue a generation; `sampling` a Sampling (or a temperature)."""
        if not isinstance(sampling, Sampling):
            sampling = Sampling(temperature=float(sampling))
        if len(ids) > self.config.max_prompt_tokens:
            raise InvalidRequest(f"prompt has {len(ids)} tokens; the limit is {self.config.max_prompt_tokens}",
                                 "prompt_too_long")
        job = Job(ids, adapter, max_tokens, sampling, asyncio.get_running_loop(), asyncio.Queue(),
                  ignore_eos=ignore_eos)
        with self.registry:  # checked again here: the adapter may have been deleted since resolve()
            if adapter is not None and adapter not in self.adapter_names():
                raise NotFound(f"model {adapter!r} not found (deleted); available: "
                               f"{[self.base_name, *self.adapter_names()]}", "model_not_found")
            if adapter is not None:
                self.in_use[adapter] = self.in_use.get(adapter, 0) + 1
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
            with self.lock:
                try:
                    live = [job for job in batch if not job.cancelled]
                    if live:
                        with torch.inference_mode():
                            self._decode(live)
                except Exception as e:  # a failed batch fails its requests, never the server
                    for job in batch:
                        job.loop.call_soon_threadsafe(job.out.put_nowait, e)
                finally:
                    self._release(batch)

    def _decode(self, batch: list[Job]) -> None:
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        width = max(len(j.ids) for j in batch)
        ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in batch], device=self.device)
        names = [j.adapter for j in batch]
        kwargs = {"adapter_names": names} if self._loaded() else {}
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        done = [False] * len(batch)
        for _ in range(max(j.max_tokens for j in batch)):
            logits = out.logits[:, -1].float()
            next_ids = []
            for i, job in enumerate(batch):
                token = job.sampling.pick(logits[i], job.generated)
                next_ids.append(token)
                done[i] = done[i] or job.cancelled  # its client is gone: stop spending steps on it
                if done[i]:
                    continue
                job.generated.append(token)
                finished = (token == eos and not job.ignore_eos) or len(job.generated) >= job.max_tokens
                job.loop.call_soon_threadsafe(job.out.put_nowait, (token, finished))
                done[i] = finished
            if all(done):
                return
            mask = torch.cat([mask, torch.ones(len(batch), 1, dtype=mask.dtype, device=self.device)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=torch.tensor(next_ids, device=self.device)[:, None], attention_mask=mask,
                             position_ids=positions,
                             past_key_values=out.past_key_values, use_cache=True, **kwargs)

