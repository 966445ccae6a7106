"""DoRA (weight-decomposed LoRA, Liu et al. 2024) as pure functions.

W' = m · (W + s·BA) / ||W + s·BA||_c, with the column norm (one per output unit) treated as a
constant in backward (the paper's §4.3 memory-saving form, as PEFT does). The layer computes

    out = base(x) + (m/n - 1) · W x + (m/n) · s · B A x,       n = ||W + s·BA||_c  (detached)

which equals W' x + bias without ever forming W'.
"""

from __future__ import annotations

import torch


def magnitude_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """PEFT's stored shape: (d_out,) for linear layers, (1, c_out, 1, ...) for convolutions."""
    return (weight.shape[0],) if weight.dim() == 2 else (1, weight.shape[0], *([1] * (weight.dim() - 2)))


def weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-output-unit L2 norm of W + ΔW, shape (d_out,). W is (d_out, d_in, *kernel); computed in fp32."""
    full = weight.float() + delta.float()
    return full.flatten(1).norm(p=2, dim=1)


def magnitude_scale(magnitude: torch.Tensor, norm: torch.Tensor, ndim: int) -> torch.Tensor:
    """m / n, broadcastable over an output whose channel axis is -1 (ndim == 0: linear) or 1 (conv)."""
    scale = magnitude.reshape(-1) / norm.detach()
    return scale if ndim == 0 else scale.view(1, -1, *([1] * ndim))


def dora_update(base_out_nobias: torch.Tensor, lora_out: torch.Tensor, scale: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """The amount DoRA adds to base(x): (m/n - 1)·Wx + (m/n)·s·BAx."""
    return (scale - 1) * base_out_nobias + scale * lora_out * scaling


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', n): the merged DoRA weight and the norm needed to undo it. Shapes as `weight`; fp32."""
    norm = weight_norm(weight, delta)
    factor = (magnitude.float().reshape(-1) / norm).view(-1, *([1] * (weight.dim() - 1)))
    return factor * (weight.float() + delta.float()), norm


def unmerged_weight(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                    norm: torch.Tensor) -> torch.Tensor:
    """Inverse of `merged_weight`: W = W' · n/m - ΔW."""
    factor = (magnitude.float().reshape(-1) / norm).view(-1, *([1] * (merged.dim() - 1)))
    return merged.float() / factor - delta.float()
