"""RMSNorm (Llama's form) as one autograd function: y = w * bf16(x * rsqrt(mean(x^2) + eps)).

transformers' module upcasts x to fp32 and autograd keeps the fp32 copies (about 10 bytes per
hidden value per norm). This function keeps only x (its own dtype) and one fp32 rstd per row,
and recomputes the rest in backward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..utils import swap_modules

# Norm classes whose forward is exactly the formula above (not Gemma's 1 + w, not LayerNorm).
LLAMA_STYLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "SmolLM3RMSNorm")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32, or fp64 for gradcheck
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        n = x.to(rstd.dtype) * rstd
        grad_n = grad_out.to(rstd.dtype) * weight.to(rstd.dtype)
        grad_x = rstd * (grad_n - n * (grad_n * n).mean(-1, keepdim=True))
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out.to(rstd.dtype) * n.to(x.dtype).to(rstd.dtype)).reshape(-1, x.shape[-1]).sum(0)
            grad_w = grad_w.to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


class FusedRMSNorm(nn.Module):
    """Drop-in for a Llama-style RMSNorm module, sharing its weight."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        self.original_class = type(norm).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused (was {self.original_class})"


def fuse_rms_norms(model: nn.Module) -> int:
    """Swap every Llama-style RMSNorm instance in `model` for FusedRMSNorm. Returns how many."""
    return swap_modules(model, lambda m: type(m).__name__ in LLAMA_STYLE_NORMS, FusedRMSNorm)
