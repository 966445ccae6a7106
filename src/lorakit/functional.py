"""LoRA math as pure functions: tensors in, tensors out. Layers call these; tests test them.

Shapes follow PEFT's parameters:
  Linear     A: (r, d_in)            B: (d_out, r)          W: (d_out, d_in)  [(d_in, d_out) if fan_in_fan_out]
  Embedding  A: (r, num_embeddings)  B: (embedding_dim, r)  W: (num_embeddings, embedding_dim)
  ConvNd     A: (r, c_in, *kernel)   B: (c_out, r, 1, ...)  W: (c_out, c_in, *kernel)
"""

from __future__ import annotations

import math

import torch


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (rsLoRA).

    >>> lora_scaling(32, 16), lora_scaling(32, 16, use_rslora=True)
    (2.0, 8.0)
    """
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # Low-precision matmuls on some CPUs are slow and lossy: form deltas in fp32.
    return torch.float32 if any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors) else tensors[0].dtype


def linear_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """ΔW = s · B @ A, transposed for fan_in_fan_out layers (GPT-2's Conv1D stores W as (d_in, d_out))."""
    dtype = _compute_dtype(lora_A, lora_B)
    delta = (lora_B.to(dtype) @ lora_A.to(dtype)) * scaling
    return delta.T if fan_in_fan_out else delta


def embedding_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s · (B @ A)^T for an embedding table of shape (num_embeddings, embedding_dim)."""
    return linear_delta(lora_A, lora_B, scaling, fan_in_fan_out=True)


def conv_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW[o, i, k...] = s · Σ_r B[o, r] A[r, i, k...]; B is a 1x1 conv, so this is exact for any kernel size."""
    dtype = _compute_dtype(lora_A, lora_B)
    return torch.tensordot(lora_B.to(dtype).flatten(1), lora_A.to(dtype), dims=1) * scaling


def merge(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + ΔW in W's dtype (the add happens in the wider of the two dtypes)."""
    return (weight.to(torch.promote_types(weight.dtype, delta.dtype)) + delta).to(weight.dtype)


def unmerge(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W - ΔW: the inverse of `merge` (exact up to rounding in W's dtype)."""
    return (weight.to(torch.promote_types(weight.dtype, delta.dtype)) - delta).to(weight.dtype)

