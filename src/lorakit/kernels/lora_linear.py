"""One autograd function for `base(x) + s * B(A(drop(x)))`.

Why: the module path saves a separate (dropped-out, fp32-cast) copy of x for every adapted layer
and computes a weight gradient nobody needs. This function saves x once (in the compute dtype),
the dropout mask as bytes, and A(x) (r columns); backward never touches the frozen weight's
gradient. Adapter weights stay fp32 (for the optimizer) and are cast to x's dtype for the matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, training: bool):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        A = lora_A.to(x.dtype)
        B = lora_B.to(x.dtype)
        mask = None
        if dropout_p > 0 and training:
            mask = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1 - dropout_p)
            xd = x2 * mask / (1 - dropout_p)
        else:
            xd = x2
        after_A = xd @ A.T
        out = F.linear(x2, weight, bias)
        out = torch.addmm(out, after_A, B.T, alpha=scaling)
        ctx.save_for_backward(x2 if mask is not None else xd, mask, after_A, weight, A, B)
        ctx.scaling, ctx.dropout_p, ctx.shape = scaling, dropout_p, shape
        ctx.adapter_dtype = lora_A.dtype
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, mask, after_A, weight, A, B = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)
        gB = g @ B  # (N, r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            lora_grad = (gB @ A) * s
            if mask is not None:
                lora_grad = lora_grad * mask / (1 - ctx.dropout_p)
            grad_x = (g @ weight + lora_grad).view(ctx.shape)
        if ctx.needs_input_grad[3]:
            xd = x2 * mask / (1 - ctx.dropout_p) if mask is not None else x2
            grad_A = ((gB.T @ xd) * s).to(ctx.adapter_dtype)
        if ctx.needs_input_grad[4]:
            grad_B = ((g.T @ after_A) * s).to(ctx.adapter_dtype)
        grad_w = g.T @ x2 if ctx.needs_input_grad[1] else None  # frozen in LoRA training: skipped
        return grad_x, grad_w, None, grad_A, grad_B, None, None, None


def fused_lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                      training: bool = True) -> torch.Tensor:
    """F.linear(x, weight, bias) + scaling * dropout(x) @ A^T @ B^T, with a memory-lean backward."""
    return _FusedLoraLinear.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
