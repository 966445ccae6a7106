"""Run-time capability checks (the CPU type varies between machines: never assume it)."""

from __future__ import annotations

import contextlib
import functools

import torch


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
    from torch.nn.attention import SDPBackend, sdpa_kernel

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
    import ctypes
    import ctypes.util

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
