"""SwiGLU (Llama's MLP gate): silu(gate) * up as one autograd function that saves only gate and up.

Autograd saves gate (for silu), silu(gate) and up (for the product) — three intermediate-width
tensors per layer. This function keeps gate and up and recomputes silu(gate) in backward (one
elementwise pass), so every MLP keeps one intermediate-width activation fewer for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import swap_modules

# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)), and SiLU modules
# (torch's, and transformers' ACT2FN["silu"]) whose forward is F.silu.
LLAMA_STYLE_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "SmolLM3MLP")
SILU_MODULES = ("SiLU", "SiLUActivation")


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad_out * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, saving only gate and up for backward."""
    return _SwiGLU.apply(gate, up)


class FusedSwiGLUMLP(nn.Module):
    """Drop-in for a Llama-style MLP, holding the same gate_proj/up_proj/down_proj (same state-dict keys)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.original_class = type(mlp).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    def extra_repr(self) -> str:
        return f"fused SwiGLU (was {self.original_class})"


def fuse_swiglu_mlps(model: nn.Module) -> int:
    """Swap every Llama-style MLP with a SiLU gate in `model` for FusedSwiGLUMLP. Returns how many."""
    def is_swiglu_mlp(m: nn.Module) -> bool:
        return (type(m).__name__ in LLAMA_STYLE_MLPS and type(getattr(m, "act_fn", None)).__name__ in SILU_MODULES
                and all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj")))

    return swap_modules(model, is_swiglu_mlp, FusedSwiGLUMLP)
