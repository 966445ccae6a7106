"""Cross-entropy of `hidden @ weight^T` over a large vocabulary, in row chunks.

The full (rows x vocab) logits are never materialised: each chunk's logits are formed in the
compute dtype and reduced with an fp32 log-sum-exp. When a gradient will be needed, the same chunk's
softmax is turned into the gradient right there (d loss / d logits = softmax - one-hot, which needs no
upstream gradient: the loss is a sum, so backward only scales it), and the (rows x d) gradient of the
hidden states is kept instead of the hidden states. So the head's logits are formed once per step, not
again in backward: on an AVX2 EPYC (fp32) the head + loss of 812 rows x 49,152 words took 2.13 s forward
+ backward with recomputation, 0.98 s this way (chunks of 512 rows).
"""

from __future__ import annotations

import torch

from .saved_activations import keep_exact

CHUNK_BYTES = 100 * 2**20  # one chunk's fp32 logits: 512 rows of a 49,152-word vocabulary


def chunk_rows_for(vocab: int) -> int:
    """Rows of logits formed at a time: as many as fit CHUNK_BYTES in fp32 (a multiple of 64, at least 64).
    Fewer, larger chunks run the head's matmul faster; the budget caps the transient memory."""
    return max(64, CHUNK_BYTES // (4 * vocab) // 64 * 64)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows: int, grad_enabled: bool):
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        # (needs_input_grad says which inputs require grad even under no_grad, so grad mode is passed in)
        want_hidden, want_weight = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if want_weight else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        # one logits buffer for all chunks (and one fp32 buffer for a bf16 run's upcast): a fresh 100 MB block per
        # chunk is a fresh mmap (past glibc's largest heap threshold), its pages faulted in and zeroed again each
        # time (AVX-512-BF16 EPYC, bf16 head + loss forward + backward, best of 5: 736 rows 312 -> 293 ms, 1864
        # rows 799 -> 687 ms; in a short-row training step 212 -> 183 ms)
        shape = (min(n, chunk_rows), weight.shape[0])
        buffer = torch.empty(shape, dtype=hidden.dtype, device=hidden.device)
        wide = buffer if acc == hidden.dtype else torch.empty(shape, dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, y = hidden[rows], labels[rows]
            narrow = torch.mm(h, weight.T, out=buffer[:h.shape[0]])
            logits = narrow if wide is buffer else wide[:h.shape[0]].copy_(narrow)
            picked = (torch.arange(h.shape[0], device=h.device), y)
            target = logits[picked]
            peak = logits.amax(dim=-1, keepdim=True)  # log-sum-exp in place: ~5x torch.logsumexp on CPU in fp32
            sums = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)
            total += (peak + sums.log()).sum() - target.sum()
            if not (want_hidden or want_weight):
                continue
            probs = logits.div_(sums)  # softmax
            probs[picked] -= 1.0  # d (lse - target) / d logits
            probs = probs if wide is buffer else narrow.copy_(probs)  # the chunk's own logits are spent
            if want_hidden:
                torch.mm(probs, weight, out=grad_hidden[rows])
            if want_weight:
                grad_weight += (probs.T @ h).to(acc)
        # gradients, not activations: saved as they are (no bf16 storage under compressed_activations)
        ctx.save_for_backward(*(None if g is None else keep_exact(g) for g in
                                (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.to(grad_hidden.dtype if grad_hidden is not None else grad_weight.dtype)
        return (None if grad_hidden is None else grad_hidden * scale,
                None if grad_weight is None else grad_weight * scale, None, None, None)


class _VocabSlicedCrossEntropy(torch.autograd.Function):
    """The same sum for a frozen head stored narrower than the compute dtype (a bf16 head, fp32 hidden states):
    the vocabulary is walked in slices, each slice of the head cast to the compute dtype only while it is used,
    with a running (online) log-sum-exp per row. The head is never held whole in the compute dtype (a 128k x 4096
    head: 2.1 GB in fp32, 1.05 GB as stored). No gradient for the head (it is frozen)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, slice_rows: int):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        peak = torch.full((n,), float("-inf"), dtype=acc, device=hidden.device)
        sum_exp = torch.zeros(n, dtype=acc, device=hidden.device)
        target = torch.zeros(n, dtype=acc, device=hidden.device)
        for start in range(0, weight.shape[0], slice_rows):
            logits = (hidden @ weight[start:start + slice_rows].to(hidden.dtype).T).to(acc)
            inside = (labels >= start) & (labels < start + logits.shape[1])
            target[inside] = logits[inside].gather(1, (labels[inside] - start)[:, None]).squeeze(1)
            new_peak = torch.maximum(peak, logits.amax(dim=1))
            sum_exp.mul_((peak - new_peak).exp()).add_(logits.sub_(new_peak[:, None]).exp_().sum(dim=1))
            peak = new_peak
        lse = peak + sum_exp.log()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.slice_rows = slice_rows
        return (lse - target).sum()

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels, lse = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            raise RuntimeError("the vocabulary-sliced cross-entropy is for a frozen head (no weight gradient)")
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_hidden = torch.zeros_like(hidden, dtype=lse.dtype)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        for start in range(0, weight.shape[0], ctx.slice_rows):
            w = weight[start:start + ctx.slice_rows].to(hidden.dtype)
            probs = (hidden @ w.T).to(lse.dtype).sub_(lse[:, None]).exp_()
            inside = (labels >= start) & (labels < start + w.shape[0])
            probs[rows[inside], labels[inside] - start] -= 1.0
            grad_hidden += (probs.to(hidden.dtype) @ w).to(lse.dtype)
        return (grad_hidden * grad_total).to(hidden.dtype), None, None, None


VOCAB_SLICE_ROWS = 8192


def sliced_linear(x: torch.Tensor, weight_of: torch.nn.Module, slice_rows: int = VOCAB_SLICE_ROWS) -> torch.Tensor:
    """x @ W^T (+ b) in x's dtype for a module whose weight is stored narrower (a bf16 output head, fp32 compute):
    the weight is cast `slice_rows` output rows at a time, never whole."""
    weight, bias = weight_of.weight, weight_of.bias
    out = torch.cat([x @ weight[s:s + slice_rows].to(x.dtype).T for s in range(0, weight.shape[0], slice_rows)], -1)
    return out if bias is None else out + bias.to(x.dtype)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk_rows: int | None = None) -> torch.Tensor:
    """sum_i CE(hidden[i] @ weight^T, labels[i]) for rows `hidden` (N, d) and integer labels (N,).

    Equals F.cross_entropy(hidden @ weight.T, labels, reduction="sum") (fp32 log-sum-exp). A frozen `weight`
    stored in a narrower float dtype than `hidden` (bf16 head, fp32 compute) is used slice by slice, cast as it
    goes (see _VocabSlicedCrossEntropy); otherwise the rows are processed `chunk_rows` at a time (default:
    `chunk_rows_for(vocabulary size)`), the gradients formed in the same pass.
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    if weight.dtype != hidden.dtype and not weight.requires_grad:
        return _VocabSlicedCrossEntropy.apply(hidden, weight, labels, VOCAB_SLICE_ROWS)
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_rows or chunk_rows_for(weight.shape[0]),
                                     torch.is_grad_enabled())
