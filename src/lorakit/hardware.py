"""Run-time capability checks (the CPU type varies between machines: never assume it)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """True where bf16 matmuls are native: CUDA with bf16, or a CPU with AVX512-BF16 / AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


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
    """The base model's dtype for inference: `auto` = bf16 where the device has fast bf16 (AVX512-BF16, AMX,
    CUDA), else fp32; or bf16 / fp16 / fp32 as asked."""
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


def release_freed_memory() -> None:
    """Give memory freed by the last step back to the OS (glibc keeps it, fragmenting, otherwise)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


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
    `slack_gb` above where the last release left it.

    glibc keeps memory freed by tensors in its heap for reuse, and training's allocation pattern (each layer's
    temporaries freed around tensors that live on: the hidden states kept for checkpointing) fragments it: freed
    memory piles up layer after layer. Measured on a 1B QLoRA step (fp32 compute, batch 4 x 512): resident memory
    1.4 -> 5.1 GB while live tensors stayed near 2 GB; an 8B step grew past 22 GB. Releasing after every layer
    costs ~35 % of the step in page faults (the memory is reused at once); releasing only each `slack_gb` of growth
    bounds the waste at `slack_gb` for a few releases per step."""

    def __init__(self, slack_gb: float, poll_s: float = 0.05):
        self.slack_gb, self.poll_s = slack_gb, poll_s
        self.releases = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lorakit-freed-memory-cap", daemon=True)

    def _watch(self) -> None:
        floor = resident_gb()
        while not self._stop.wait(self.poll_s):
            if resident_gb() > floor + self.slack_gb:
                release_freed_memory()
                self.releases += 1
                floor = resident_gb()

    def __enter__(self) -> "FreedMemoryCap":
        if _libc() is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
