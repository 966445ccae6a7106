"""One autograd function for `base(x) + s * B(A(drop(x)))`.

Why: the module path saves a separate (dropped-out, fp32-cast) copy of x for every adapted layer
and computes a weight gradient nobody needs. This function saves x once (in the compute dtype),
the dropout mask as bytes, and A(x) (r columns); backward never touches the frozen weight's
gradient. Adapter weights stay fp32 (for the optimizer) and are cast to x's dtype for the matmuls.

Order of the sums (bf16): the output is computed as `s * A(x) B^T` first, then `x W^T` accumulated onto
it by the matmul itself (fp32 accumulators, one rounding at the end). The usual order, `x W^T` rounded
to bf16 and the update added after, puts the base output exactly on the bf16 grid, so every update
element smaller than half a unit in its last place rounds away, deterministically. A fresh adapter's
updates are that small: SmolLM2 trained that way (as PEFT on a bf16 base does) ended 20 steps 2.4 %
above the fp32 loss; in this order it ends within 0.1 % (bench/train_vs_peft.py). Computed this way
the update survives on average, as in one fp32 accumulation (tests/test_kernels.py measures the share
kept against float64). The input gradient is summed in the same order.
"""

from __future__ import annotations

import math

import torch

MASK_BITS = 15


def dropout_mask(shape, p: float, device) -> tuple[torch.Tensor, float]:
    """Bernoulli(p) drop-mask (True = zero this element) and the exact keep probability.

    CPU random number generation costs more than the LoRA matmuls (one draw per element with
    bernoulli_). Here one 64-bit draw gives four 15-bit uniforms; p is rounded to a multiple of
    2^-15 and the returned keep probability is the exact one, so scaling by it stays unbiased.
    """
    n = math.prod(shape)
    threshold = round(p * 2**MASK_BITS)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    lanes = words.view(torch.int16)[:n].view(shape)
    drop = torch.bitwise_and(lanes, 2**MASK_BITS - 1) < threshold
    return drop, 1.0 - threshold / 2**MASK_BITS


class _FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, training: bool):
        rebuilt = not isinstance(weight, torch.Tensor)  # a callable rebuilding a frozen weight (NF4 dequantization)
        ctx.rebuild_weight = weight if rebuilt else None
        weight = weight(True) if rebuilt else weight
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        A = lora_A.to(x.dtype)
        B = lora_B.to(x.dtype)
        mask = None
        if dropout_p > 0 and training:
            # dropout(x) = mask * x / keep; the 1/keep goes into the scaling (one pass fewer).
            mask, keep = dropout_mask(x2.shape, dropout_p, x2.device)
            scaling = scaling / keep
        xd = x2 if mask is None else x2.masked_fill(mask, 0)
        after_A = xd @ A.T
        # The update first, then the frozen matmul accumulates onto it: one rounding of base + update. Rounding the
        # base output first (to bf16) and adding the update after loses every update element under half a unit in
        # the last place of the output, and an adapter's first updates are that small (kernel docstring).
        scaled_B = (lora_B * scaling).to(x.dtype)
        # allocated in the output's shape and filled through a 2-D view: the function returns a tensor of its own
        # (a caller may modify it in place, as Falcon does), not a view of a temporary
        result = torch.empty(*shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
        out = torch.mm(after_A, scaled_B.T, out=result.view(-1, weight.shape[0])).addmm_(x2, weight.T)
        if bias is not None:  # after: a bias is on the bf16 grid, and the update rounded onto it alone would vanish
            out += bias
        # x itself (not the x2 view): q, k and v (gate and up) get the same x object, so a saved-tensor
        # hook (kernels.saved_activations) can store it once for all of them
        ctx.save_for_backward(x, mask, after_A, None if rebuilt else weight, A, B)
        ctx.scaling, ctx.shape = scaling, shape
        ctx.adapter_dtype = lora_A.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return result

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, after_A, weight, A, B = ctx.saved_tensors
        if ctx.rebuild_weight is not None:
            weight = ctx.rebuild_weight(False)
        x2 = x.reshape(-1, x.shape[-1])
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)
        gB = g @ B  # (N, r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:  # the update's part first, the frozen weight's accumulated onto it (as forward)
            grad_x = gB @ (A * s)
            if mask is not None:
                grad_x.masked_fill_(mask, 0)
            grad_x = grad_x.addmm_(g, weight).view(ctx.shape)
        if ctx.needs_input_grad[3]:
            xd = x2 if mask is None else x2.masked_fill(mask, 0)
            grad_A = ((gB.T @ xd) * s).to(ctx.adapter_dtype)
        if ctx.needs_input_grad[4]:
            grad_B = ((g.T @ after_A) * s).to(ctx.adapter_dtype)
        grad_w = g.T @ x2 if ctx.needs_input_grad[1] else None  # frozen in LoRA training: skipped
        # a trained bias (bias="all" / "lora_only"); summed in fp32 over the rows
        grad_bias = g.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_bias, grad_A, grad_B, None, None, None


def fused_lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                      training: bool = True) -> torch.Tensor:
    """F.linear(x, weight, bias) + scaling * dropout(x) @ A^T @ B^T, with a memory-lean backward.

    `weight`: the frozen weight, or a callable `weight(keep: bool) -> Tensor` that rebuilds it (an NF4 layer's
    dequantization; `keep`: the forward's call, which may cache it for the backward's). A rebuilt weight is not
    saved for backward: backward calls it again."""
    return _FusedLoraLinear.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
