"""Run-time capability checks (the CPU type varies between machines: never assume it)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import threading
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .utils import atomic_path, cache_root


# Products the size of a small model's projections (rows x in -> out), timed in each candidate dtype.
CALIBRATION_SHAPES = ((256, 576, 1536), (256, 1536, 576))
BF16_MARGIN = 1.1  # bf16 must beat fp32 by 10 %: its casts and roundings cost time the products do not show
# A measurement taken while the CPU is busy elsewhere understates the rates, unevenly across dtypes: where the two
# rates are within CLOSE_CALL of each other the choice could flip, so later process starts measure again (up to
# SETTLE_MEASUREMENTS in all) and the cache keeps each dtype's best rate. A clear call is measured once.
CLOSE_CALL = 2.0
SETTLE_MEASUREMENTS = 3


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's name, with what tells apart CPUs a hypervisor names alike: two classes of "AMD EPYC" (AVX2-only
    and AVX-512-BF16) multiply bf16 at 0.6x and 2.3x fp32, so a cache moved between machines (a copied home
    directory, a disk image) must not hand one's measurement to the other. The flags only identify the CPU here;
    what is fast is measured."""
    try:
        with open(cpuinfo) as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return "unknown"
    fields = {name.strip(): value.strip() for name, value in fields.items()}
    name = fields.get("model name", "unknown")
    family = [f"{part} {fields[part]}" for part in ("cpu family", "model", "stepping") if part in fields]
    flags = fields.get("flags") or fields.get("Features")  # x86 / ARM
    if flags:
        family.append("flags " + hashlib.sha1(" ".join(sorted(flags.split())).encode()).hexdigest()[:8])
    return f"{name} ({', '.join(family)})" if family else name


def _best_seconds(x: torch.Tensor, w: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x @ w
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def measure_matmul_rates(shapes=CALIBRATION_SHAPES, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of fp32 and bf16 matrix products on this CPU (best of `repeats` per shape, after a warm-up). A CPU
    that emulates bf16 (tens of times slower) is judged on one timed product, so the check stays under a second."""
    flops, seconds = 0.0, {"fp32": 0.0, "bf16": 0.0}
    for rows, d_in, d_out in shapes:
        timed = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            x, w = torch.randn(rows, d_in, dtype=dtype), torch.randn(d_in, d_out, dtype=dtype)
            x @ w  # warm-up: kernel selection, page faults
            first = _best_seconds(x, w, 1)
            slow = name == "bf16" and first > 2 * timed["fp32"]
            timed[name] = first if slow else min(first, _best_seconds(x, w, repeats - 1))
        flops += 2 * rows * d_in * d_out
        for name in seconds:
            seconds[name] += timed[name]
        if timed["bf16"] > 2 * timed["fp32"]:  # decided: more shapes would only cost time
            break
    return {name: round(flops / s / 1e9, 1) for name, s in seconds.items()}


def _settled(entry: dict) -> bool:
    fast, slow = max(entry["fp32"], entry["bf16"]), min(entry["fp32"], entry["bf16"])
    return entry.get("measurements", 1) >= SETTLE_MEASUREMENTS or fast >= CLOSE_CALL * slow


def _with_measurement(entry: dict | None, rates: dict[str, float]) -> dict:
    """The cache entry after one more measurement: each dtype's best rate so far, and the count."""
    if entry is None:
        return {**rates, "measurements": 1}
    return {**{name: max(entry[name], rates[name]) for name in rates}, "measurements": entry.get("measurements", 1) + 1}


def cached_rates(kind: str, measure) -> dict[str, float]:
    """measure() (GFLOP/s per dtype) per CPU, torch version and thread count, kept in the cache
    ($XDG_CACHE_HOME/lorakit/calibration.json) under `kind` ("" for the matrix products). Measured once where one
    dtype is CLOSE_CALL times faster; a close call is measured at the next starts too, up to SETTLE_MEASUREMENTS
    times, keeping each dtype's best rate (a busy CPU only ever slows a measurement)."""
    key = f"{kind + ': ' if kind else ''}{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = os.path.join(cache_root(), "calibration.json")
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    if not isinstance(table, dict):
        table = {}
    entry = table.get(key)
    if not isinstance(entry, dict) or not {"fp32", "bf16"} <= set(entry):
        entry = None
    if entry is None or not _settled(entry):
        table[key] = entry = _with_measurement(entry, measure())
        with contextlib.suppress(OSError):  # a read-only cache only costs a measurement per process
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "w") as f:
                json.dump(table, f, indent=1)
    return {"fp32": entry["fp32"], "bf16": entry["bf16"]}


@functools.lru_cache(maxsize=1)
def cpu_matmul_rates() -> dict[str, float]:
    """measure_matmul_rates, cached (cached_rates): the flags a CPU lists say what it can decode, not what is fast
    (one Xeon listing avx512_bf16 multiplies bf16 at 0.57x its fp32 rate, an EPYC listing it at 3.5x)."""
    return cached_rates("", lambda: measure_matmul_rates())


def fast_bf16(device: torch.device | str = "cpu", rates: dict[str, float] | None = None) -> bool:
    """True where bf16 is the faster compute dtype: CUDA with bf16; on a CPU, where bf16 products measured faster
    than fp32 by BF16_MARGIN (cpu_matmul_rates, or the `rates` given)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    rates = rates or cpu_matmul_rates()
    return rates["bf16"] > BF16_MARGIN * rates["fp32"]


def dtype_decision(device: torch.device | str = "cpu") -> dict:
    """What `auto` chose and the figures it chose by: {"compute_dtype", "device", and on a CPU the measured
    "gflops" per dtype, "cpu" (cpu_model), "threads", "bf16_margin" and "probe_s", the seconds the decision took
    (measuring, or reading the cache)} (a run's metrics.jsonl keeps it)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"compute_dtype": "bf16" if fast_bf16(device) else "fp32", "device": "cuda",
                "gpu": torch.cuda.get_device_name(device)}
    start = time.perf_counter()
    rates = cpu_matmul_rates()
    return {"compute_dtype": "bf16" if fast_bf16(device, rates) else "fp32", "device": device.type,
            "gflops": dict(rates), "cpu": cpu_model(), "threads": torch.get_num_threads(), "bf16_margin": BF16_MARGIN,
            "probe_s": round(time.perf_counter() - start, 3)}  # ~0 where the cache answered


def compute_dtype_note(decision: dict) -> str:
    """A dtype_decision as a run's first line."""
    if "gflops" not in decision:
        return f"auto dtype: {decision['compute_dtype']} ({decision['device'].upper()})"
    rates = decision["gflops"]
    return (f"auto dtype: {decision['compute_dtype']} (measured on this CPU: fp32 {rates['fp32']:g} GFLOP/s, "
            f"bf16 {rates['bf16']:g} GFLOP/s; bf16 is chosen above {decision['bf16_margin']:g}x fp32)")


def check_device_setting(setting: str) -> None:
    """`device` must be auto, cpu or cuda (whether a GPU is there is checked when training starts)."""
    if setting not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {setting!r}")


def resolve_device_type(setting: str) -> str:
    """'cuda' or 'cpu' for `device: auto|cpu|cuda` (auto = the GPU when torch sees one)."""
    check_device_setting(setting)
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but torch sees no CUDA GPU (use device: auto or cpu)")
    return "cuda" if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()) else "cpu"


def attention_backends(device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """Where training runs attention: on CUDA, SDPA's flash, memory-efficient or math kernels, not cuDNN's.

    cuDNN attention builds an execution plan for every new (batch, length) shape; with training batches
    of varying length that cost 2.4 ms of CPU per forward call and 2.1 ms per backward on an H100
    (10-30 us of GPU work each), the largest item in a step's profile. Elsewhere: torch's choice.
    """
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


RUNTIME_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_dtype_setting(setting: str) -> None:
    """`dtype` must be auto, bf16, fp16 or fp32."""
    if setting != "auto" and setting not in RUNTIME_DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(RUNTIME_DTYPES)}, got {setting!r}")


def resolve_dtype(setting: str, device_type: str) -> torch.dtype:
    """The base model's dtype for inference: `auto` = bf16 where it measured faster (fast_bf16), else fp32; or
    bf16 / fp16 / fp32 as asked."""
    check_dtype_setting(setting)
    if setting == "auto":
        return torch.bfloat16 if fast_bf16(device_type) else torch.float32
    return RUNTIME_DTYPES[setting]


def resolve_bf16(setting: bool | str, device: torch.device | str = "cpu") -> bool:
    if setting == "auto":
        return fast_bf16(device)
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"bf16 must be true, false or 'auto', got {setting!r}")


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory(keep_gb: float | None = None) -> None:
    """Give memory freed by the last step back to the OS (glibc keeps it, fragmenting, otherwise); nothing while
    resident memory is at or below `keep_gb` (the run's planned level): the next step would fault it back in.
    Measured on SmolLM2-135M, 8 rows of ~92 tokens (AVX2 EPYC): a release every 10 steps below the plan cost the
    next step ~356,000 page faults and ~1.2 s of its ~3.5 s."""
    libc = _libc()
    if libc is not None and not (keep_gb and resident_gb() <= keep_gb):
        libc.malloc_trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def keep_freed_heap() -> None:
    """Let glibc reuse freed memory instead of returning it on every free: tensors up to 32 MB (glibc's largest
    mmap threshold) come from the heap, and the heap top is trimmed only past 1 GB free; FreedMemoryCap then
    decides when memory goes back. Process-wide and lasting (glibc has no way to restore its adaptive defaults)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def resident_gb() -> float:
    """This process's resident memory now (GB; 0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:
        return 0.0


def peak_resident_gb() -> float:
    """This process image's resident high-water mark (VmHWM, GB; 0 where /proc is absent). Not ru_maxrss, which a
    process keeps across exec: a subprocess forked from a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0) / 1e9
    except OSError:
        return 0.0


class FreedMemoryCap:
    """While active, a thread returns freed heap memory to the OS whenever the process's resident memory has grown
    `slack_gb` above where the last release left it and is above `keep_gb` (the run's planned level, when known).

    glibc keeps memory freed by tensors in its heap for reuse, and training's allocation pattern (each layer's
    temporaries freed around tensors that live on: the hidden states kept for checkpointing) fragments it: freed
    memory piles up layer after layer. Measured on a 1B QLoRA step (fp32 compute, batch 4 x 512): resident memory
    1.4 -> 5.1 GB while live tensors stayed near 2 GB; an 8B step grew past 22 GB. Releasing after every layer
    costs ~35 % of the step in page faults (the memory is reused at once); releasing only each `slack_gb` of growth
    bounds the waste at `slack_gb` for a few releases per step. Memory the plan expects the run to use (`keep_gb`)
    is never returned (and glibc is told to keep it too: keep_freed_heap): a step's own activations would be faulted
    back in at once. Measured on SmolLM2-135M, 8 rows of ~233 tokens (AVX2 EPYC, alternating runs): releasing every
    0.5 GB of growth cost ~800,000 page faults a step; keeping up to the plan's level, ~30,000, the steps 8-11 %
    faster, peak RSS 3.7 -> 4.5 GB (predicted 4.3 GB, kept up to 5.2)."""

    def __init__(self, slack_gb: float, poll_s: float = 0.05, keep_gb: float | None = None):
        self.slack_gb, self.poll_s, self.keep_gb = slack_gb, poll_s, keep_gb or 0.0
        self.releases = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lorakit-freed-memory-cap", daemon=True)

    def _watch(self) -> None:
        floor = resident_gb()
        while not self._stop.wait(self.poll_s):
            if resident_gb() > max(floor + self.slack_gb, self.keep_gb):
                release_freed_memory()
                self.releases += 1
                floor = resident_gb()

    def __enter__(self) -> "FreedMemoryCap":
        if _libc() is not None:
            if self.keep_gb:
                keep_freed_heap()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
