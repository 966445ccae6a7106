"""The dtype padding-free training attention runs in when the model computes in bf16: measured, not assumed.

torch's CPU flash attention is slower in bf16 than in fp32 on some CPUs, even counting the casts: on a 2-core
AVX-512-BF16 EPYC one row of 92 tokens (9 query / 3 key-value heads of 64) takes 3.3 ms forward + backward in bf16
against 1.2 ms with its bf16 inputs cast to fp32 and the output cast back, and attention was a fifth of the
training step. Where fp32 wins by ATTENTION_MARGIN, the per-row attention of padding-free batches
(kernels/varlen_attention.py) casts: the output is rounded to bf16 as before, from a more exact computation.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from .. import hardware

ATTENTION_MARGIN = 1.1
# one row of a small model's attention: query heads, key-value heads, tokens, head dim
CALIBRATION_SHAPE = (9, 3, 128, 64)
MODULE_ATTRIBUTE = "lorakit_attention_dtype"  # set on attention modules by the fast paths


def _forward_backward_seconds(upcast: bool, repeats: int = 3) -> float:
    heads, kv_heads, tokens, dim = CALIBRATION_SHAPE
    q = torch.randn(1, heads, tokens, dim, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, tokens, dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, heads, tokens, dim, dtype=torch.bfloat16)
    best = float("inf")
    for attempt in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        inputs = [t.float() for t in (q, k, v)] if upcast else [q, k, v]
        out = F.scaled_dot_product_attention(*inputs, is_causal=True, enable_gqa=True)
        out.to(torch.bfloat16).backward(grad)
        if attempt:
            best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def measure_attention_rates() -> dict[str, float]:
    """GFLOP/s of one causal attention row forward + backward on bf16 inputs: computed in bf16, and cast to fp32
    (casts included). Nominal FLOPs (the same count for both), so only their ratio means anything."""
    heads, _, tokens, dim = CALIBRATION_SHAPE
    flops = 3.5 * 2 * heads * tokens * tokens * dim  # forward's two products over the causal half, backward 2.5x
    return {name: round(flops / _forward_backward_seconds(name == "fp32") / 1e9, 1) for name in ("bf16", "fp32")}


@functools.lru_cache(maxsize=1)
def cpu_attention_rates() -> dict[str, float]:
    return hardware.cached_rates("attention", lambda: measure_attention_rates())


def attention_in_fp32(rates: dict[str, float] | None = None) -> bool:
    """True where bf16 attention rows run faster cast to fp32 on this CPU (by ATTENTION_MARGIN)."""
    rates = rates or cpu_attention_rates()
    return rates["fp32"] > ATTENTION_MARGIN * rates["bf16"]


def attention_dtype_note(fp32: bool, rates: dict[str, float] | None = None) -> str:
    rates = rates or cpu_attention_rates()
    return (f"attention: {'fp32 (bf16 inputs cast)' if fp32 else 'bf16'} for padding-free rows (measured on this CPU: "
            f"bf16 {rates['bf16']:g}, cast to fp32 {rates['fp32']:g} GFLOP/s)")


def set_attention_dtype(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Mark the model's attention modules (those with `is_causal`) to run padding-free rows in `dtype`; returns
    how many were marked."""
    marked = 0
    for module in model.modules():
        if hasattr(module, "is_causal"):
            setattr(module, MODULE_ATTRIBUTE, dtype)
            marked += 1
    return marked
