"""Mixed-adapter batches: every row of a batch names its own adapter (or None for the base model).

Per LoRA layer the adapters' factors are stacked once (ranks zero-padded to the largest, scaling
folded into B) and cached per layer and tuple of adapter names, rebuilt when an adapter changes.
Each row gathers its own (A, B) pair and the batch's update is two batched matmuls (bmm), no loop
over adapters. (One GEMM against all adapters' A's side by side, masked per row, was measured too:
faster alone, 15 % slower inside generate on this CPU, so it was dropped.)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

BASE = None  # a row that uses no adapter


def length_mismatch(row_adapters: list, x: torch.Tensor) -> ValueError:
    """PEFT's error for `adapter_names` that do not name one adapter per batch row."""
    return ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                      f"{len(row_adapters)} and {x.shape[0]} respectively (beam search / num_return_sequences > 1 "
                      "are not supported with adapter_names)")


def check_mixable(layer, names) -> None:
    """Refuse forms whose rows cannot share a batch (DoRA: a weight norm per adapter)."""
    unmixable = {n: layer.adapters[n].form.label for n in names if not layer.adapters[n].form.mixable}
    if unmixable:
        kinds = sorted(set(unmixable.values()))
        raise ValueError(f"Cannot pass `adapter_names` when {' or '.join(kinds)} is enabled. Mixed-adapter batches do "
                         f"not support {', '.join(kinds)} adapters ({sorted(unmixable)}); merge or serve them alone")


def stacked_factors(layer, names: tuple[str, ...]):
    """(A_stack (n+1, r_max, d_in), B_stack (n+1, d_out, r_max)) in the adapters' dtype (fp32), slot 0 all
    zeros (= base)."""
    # Tensor._version counts in-place writes (optimizer steps, loads), so a stale stack is never used.
    adapters = [layer.adapters[n] for n in names]
    check_mixable(layer, names)
    key = tuple((n, layer.factor_versions(n), a.scaling) for n, a in zip(names, adapters))
    cache = layer.__dict__.setdefault("_stack_cache", {})
    if key not in cache:
        cache.clear()
        r_max = max(a.r for a in adapters)
        ref = layer.effective_factors(names[0])[0]
        A = ref.new_zeros(len(names) + 1, r_max, layer.in_features)
        B = ref.new_zeros(len(names) + 1, layer.out_features, r_max)
        with torch.no_grad():
            for i, n in enumerate(names, start=1):
                A_n, B_n, s = layer.effective_factors(n)  # any form: LoRA, AdaLoRA (E folded), VeRA
                A[i, : A_n.shape[0]] = A_n
                B[i, :, : B_n.shape[1]] = B_n * s
        cache[key] = (A, B)
    return cache[key]


def gathered_factors(layer, names: tuple[str, ...], row_adapters: list[str | None]):
    """Each row's (Aᵀ (batch, d_in, r), Bᵀ (batch, r, d_out)) from the stacks. Cached for the current row assignment, which stays the same
    for every decoding step of a generate() call, so the gather happens once per call, not per token."""
    A, B = stacked_factors(layer, names)
    rows = tuple(row_adapters)
    cached = layer.__dict__.get("_gather_cache")
    if cached is None or cached[0] != rows or cached[1] is not A:  # the cache holds A, so `is` suffices
        slot = {n: i for i, n in enumerate(names, start=1)}
        index = torch.tensor([slot.get(n, 0) for n in row_adapters], device=A.device)
        # Stored transposed and contiguous: bmm on transposed views copies them on every call (bf16 on CPU).
        cached = (rows, A, A[index].transpose(1, 2).contiguous(), B[index].transpose(1, 2).contiguous())
        layer.__dict__["_gather_cache"] = cached
    return cached[2], cached[3]


def mixed_linear_update(layer, x: torch.Tensor, row_adapters: list[str | None]) -> torch.Tensor:
    """Σ over rows of s_row * B_row A_row x_row, as gathered batched matmuls. x: (batch, ..., d_in), or the
    batch's tokens flattened row by row, (batch * tokens, d_in), as OPT's MLP feeds its Linear layers."""
    flattened = x.dim() == 2 and x.shape[0] != len(row_adapters) and x.shape[0] % len(row_adapters) == 0
    if x.shape[0] != len(row_adapters) and not flattened:
        raise length_mismatch(row_adapters, x)
    names = tuple(sorted({n for n in row_adapters if n is not BASE and n in layer.adapters}))
    if not names:
        return None
    # The update runs in the adapters' fp32 even on a bf16 base: CPU bf16 bmm converts its operands on
    # every call (measured 3x slower than fp32 bmm at decode shapes); x is cast up, the sum cast back.
    A_rows_t, B_rows_t = gathered_factors(layer, names, row_adapters)
    rows = x.reshape(len(row_adapters), -1, x.shape[-1]).to(A_rows_t.dtype)  # (batch, tokens, d_in)
    after_A = torch.bmm(rows, A_rows_t)                                 # (batch, tokens, r_max)
    update = torch.bmm(after_A, B_rows_t)                               # (batch, tokens, d_out)
    return update.view(*x.shape[:-1], update.shape[-1])


def mixed_grouped_update(layer, x: torch.Tensor, row_adapters: list[str | None]) -> torch.Tensor | None:
    """Embedding and convolution LoRA per row: rows grouped by adapter (no single matmul to batch); each group's
    update is the layer's own single-adapter update, base rows get zeros."""
    if x.shape[0] != len(row_adapters):
        raise length_mismatch(row_adapters, x)
    names = sorted({n for n in row_adapters if n is not BASE and n in layer.adapters})
    check_mixable(layer, names)
    out = None
    for name in names:
        rows = torch.tensor([i for i, n in enumerate(row_adapters) if n == name], device=x.device)
        update = layer.lowrank_update(x[rows], name, *layer.effective_factors(name))
        if out is None:
            out = update.new_zeros(x.shape[0], *update.shape[1:])
        out[rows] = update
    return out


@contextmanager
def row_adapters(layers, names: list[str | None]):
    """Route each batch row to its adapter in every LoRA layer for the duration of the block."""
    for layer in layers:
        layer.row_adapters = list(names)
    try:
        yield
    finally:
        for layer in layers:
            layer.row_adapters = None
