"""The serving engine: one base model, its adapters (adapter_pool.py), the KV caches (kv_cache.py,
prefix_cache.py) and the worker thread that schedules every decoding step (scheduler.py). app.py is the HTTP side.

A request joins the running batch at the next step and leaves it the step it finishes (continuous batching);
each row keeps its own adapter, sampling settings and stop conditions. A cancelled job (its client
disconnected) is dropped at the next step.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import queue
import threading
from dataclasses import dataclass, field

import torch

from ..hardware import check_device_setting, check_dtype_setting, resolve_device_type, resolve_dtype
from ..adapters.inject import adapter_layers
from ..layers.mixed_batch import drop_caches
from ..models.loading import load_model, load_tokenizer
from ..utils import check_positive_int
from .adapter_pool import ADAPTER_NAME, AdapterPool
from .errors import InvalidRequest, NotFound
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .sampling import Sampling
from .scheduler import Scheduler

__all__ = ["ADAPTER_NAME", "Engine", "Job", "ServeConfig"]
GB = 1 << 30


@dataclass
class ServeConfig:
    """Server settings; invalid values raise ValueError naming the setting."""

    model: str = "smollm2-135m"
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter directory, loaded at start
    adapter_root: str | None = None  # load endpoints and lazy loading by name read only under here (None: off)
    max_batch_size: int = 16       # rows decoded together
    max_wait_ms: float = 0.0       # an idle engine waits this long for companions of its first request
    max_tokens_cap: int = 512
    max_prompt_tokens: int = 2048
    max_body_bytes: int = 1 << 20
    dtype: str = "auto"   # base model dtype: auto (bf16 where fast), bf16, fp16, fp32
    device: str = "auto"  # auto (the GPU when visible), cpu, cuda
    playground: bool = True        # the browser page at / (serve/playground.py)
    runs_dir: str | None = None    # training runs the page shows (GET /v1/runs); None: none
    prefill_chunk: int = 128       # prompt tokens prefilled per scheduler step (between decoding steps)
    kv_cache_gb: float = 2.0       # batch KV buffer + prefix cache; requests that do not fit wait
    prefix_cache_gb: float = 0.5   # of kv_cache_gb, for cached prompt prefixes (0: off)
    max_loras: int = 8             # distinct adapters in one batch (vLLM's --max-loras)
    max_cpu_loras: int = 64        # adapters kept in memory, least recently used unloaded (--max-cpu-loras)
    api_key: str | None = None     # Bearer key for every endpoint but /health
    admin_api_key: str | None = None  # Bearer key for loading / unloading adapters (default: api_key)
    allow_training: bool = False   # the playground's Train view: /v1/train routes start `lorakit train` (else 403)
    data_root: str | None = None   # data files training may read (default: RUNS/data); uploads go to ROOT/uploads
    max_upload_bytes: int = 64 << 20  # largest data file upload (413 above it)

    @property
    def training_data_root(self) -> str | None:
        """Where training may read data: data_root, else RUNS/data (None without a runs directory)."""
        return self.data_root or (os.path.join(self.runs_dir, "data") if self.runs_dir else None)

    def __post_init__(self):
        if self.allow_training and not self.runs_dir:
            raise ValueError("allow_training needs a runs directory (runs_dir / --runs DIR) for the runs it starts")
        for name in ("max_batch_size", "max_tokens_cap", "max_prompt_tokens", "max_body_bytes", "prefill_chunk",
                     "max_loras", "max_cpu_loras", "max_upload_bytes"):
            check_positive_int(name, getattr(self, name))
        for name in ("max_wait_ms", "kv_cache_gb", "prefix_cache_gb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb!r}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")
        check_dtype_setting(self.dtype)
        check_device_setting(self.device)
        if self.runs_dir is not None and not os.path.isdir(self.runs_dir):
            if not self.allow_training:  # a server that trains makes its runs directory
                raise FileNotFoundError(f"runs directory {self.runs_dir} does not exist")
            os.makedirs(self.runs_dir)
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
    finished: bool = False   # the scheduler is done with it (its adapter released)
    row: object = None       # its RowCache while the prompt is prefilled
    position: int = 0        # prompt tokens prefilled (or found in the prefix cache)
    submitted_at: float = 0.0
    last_token_at: float = 0.0

    def cancel(self) -> None:
        self.cancelled = True


def kv_column_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of one token's keys and values over all layers, from the model config."""
    text = getattr(config, "text_config", None) or config
    heads = getattr(text, "num_attention_heads", 1)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class Engine:
    """The model, its adapters, the caches, and the scheduler's worker thread."""

    def __init__(self, config: ServeConfig, model=None, tokenizer=None):
        self.config = config
        self.base_name = os.path.basename(str(config.model).rstrip("/")) or "base"
        self.tokenizer = tokenizer or load_tokenizer(config.model)
        device_type = resolve_device_type(config.device)
        self.model = model if model is not None else load_model(
            config.model, dtype=resolve_dtype(config.dtype, device_type), device=device_type)
        first = next(self.model.parameters())
        self.device, self.dtype = first.device, first.dtype
        hf_config = self.model.config
        self.attention = getattr(hf_config, "_attn_implementation", None) or "sdpa"
        forward = inspect.signature(type(getattr(self.model, "base_model", self.model)).forward).parameters
        self.cache_argument = "cache" if "cache" in forward else "past_key_values"  # transformers >= 5.x: cache
        self.column_bytes = kv_column_bytes(hf_config, self.dtype)
        self.kv_budget = int(config.kv_cache_gb * GB)
        self.eos = self.tokenizer.eos_token_id
        self.lock = threading.Lock()       # the model: decoding steps, loading, unloading
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.metrics = Metrics()
        self.prefix_cache = PrefixCache(int(min(config.prefix_cache_gb, config.kv_cache_gb) * GB))
        self.generation = 0  # bumped at every adapter load / unload (layers/mixed_batch.py: fixed_adapters)
        self.layers: list = []  # the model's LoRA layers (rows are routed to their adapters in each)
        self.pool = AdapterPool(self, config.adapter_root, config.max_cpu_loras)
        self.scheduler = Scheduler(self)
        for name, path in config.adapters.items():
            self.load_adapter(name, path, check_root=False)
        threading.Thread(target=self.scheduler.run, daemon=True).start()

    # --- adapters --------------------------------------------------------------------------
    def adapters_changed(self) -> None:
        """An adapter was loaded or unloaded (model lock held): the layer list and the weight generation the
        mixed-batch caches are keyed by are renewed."""
        self.generation += 1
        self.layers = [m for _, m in adapter_layers(self.model)]
        for layer in self.layers:
            drop_caches(layer)

    @property
    def details(self) -> dict[str, dict]:
        return self.pool.details

    def adapter_names(self) -> list[str]:
        """The adapters requests may name (known and not being deleted)."""
        return self.pool.names()

    def running_adapters(self) -> set:
        return self.scheduler.running_adapters()

    def load_adapter(self, name: str, path: str, check_root: bool = True) -> None:
        """Register adapter `name` from `path` (under the adapter root unless `check_root` is False) and load it."""
        with self.lock:
            self.pool.register(name, path, check_root)

    def delete_adapter(self, name: str) -> bool:
        """Hide adapter `name` now; remove it now if no request uses it, else when the last one finishes.
        Returns True when it was removed now."""
        return self.pool.delete(name)

    def resolve(self, model_name: str | None) -> str | None:
        if model_name in (None, "", self.base_name):
            return None
        if model_name not in self.adapter_names() and not self.pool.find_lazily(model_name):
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
        if (len(ids) + max_tokens) * self.column_bytes > self.kv_budget:
            raise InvalidRequest(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) needs more KV cache than "
                                 f"the server's budget (--kv-cache-gb {self.config.kv_cache_gb})", "too_long_for_kv")
        job = Job(ids, adapter, max_tokens, sampling, asyncio.get_running_loop(), asyncio.Queue(),
                  ignore_eos=ignore_eos)
        self.pool.hold(adapter)
        self.metrics.submitted(job)
        self.jobs.put(job)
        return job
