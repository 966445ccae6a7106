"""Mixed-adapter batches: every row of a batch names its own adapter (or None for the base model).

Per LoRA layer the adapters' factors are stacked once (ranks zero-padded to the largest, scaling
folded into B) and each row gathers its own pair, so the low-rank update of the whole batch is two
batched matmuls — no loop over adapters, no masked passes over the batch. Stacks are cached per
layer and per tuple of adapter names and rebuilt when an adapter changes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

BASE = None  # a row that uses no adapter


def stacked_factors(layer, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_stack (n+1, r_max, d_in), B_stack (n+1, d_out, r_max)) with slot 0 all zeros (= base)."""
    # Tensor._version counts in-place writes (optimizer steps, loads), so a stale stack is never used.
    dora = [n for n in names if layer.use_dora.get(n)]
    if dora:
        raise ValueError(f"mixed-adapter batches do not support DoRA adapters ({dora}); merge or serve them alone")
    key = tuple((n, tuple(p._version for p in layer.adapter_parameters(n).values()), layer.scaling[n])
                for n in names)
    cache = layer.__dict__.setdefault("_stack_cache", {})
    if key not in cache:
        cache.clear()
        r_max = max(layer.r[n] for n in names)
        ref = layer.effective_factors(names[0])[0]
        A = ref.new_zeros(len(names) + 1, r_max, layer.in_features)
        B = ref.new_zeros(len(names) + 1, layer.out_features, r_max)
        with torch.no_grad():
            for i, n in enumerate(names, start=1):
                A_n, B_n, s = layer.effective_factors(n)  # any kind: LoRA, AdaLoRA (E folded), VeRA
                A[i, : A_n.shape[0]] = A_n
                B[i, :, : B_n.shape[1]] = B_n * s
        cache[key] = (A, B)
    return cache[key]


def mixed_linear_update(layer, x: torch.Tensor, row_adapters: list[str | None]) -> torch.Tensor:
    """Σ over rows of s_row * B_row A_row x_row, as gathered batched matmuls. x: (batch, ..., d_in)."""
    if x.shape[0] != len(row_adapters):
        raise ValueError(f"adapter_names has {len(row_adapters)} entries but the batch has {x.shape[0]} rows "
                         "(beam search / num_return_sequences > 1 are not supported with adapter_names)")
    names = tuple(sorted({n for n in row_adapters if n is not BASE and n in layer.r}))
    if not names:
        return None
    A, B = stacked_factors(layer, names)
    slot = {n: i for i, n in enumerate(names, start=1)}
    index = torch.tensor([slot.get(n, 0) for n in row_adapters], device=x.device)
    rows = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)       # (batch, tokens, d_in)
    after_A = torch.bmm(rows, A[index].transpose(1, 2))               # (batch, tokens, r_max)
    update = torch.bmm(after_A, B[index].transpose(1, 2))             # (batch, tokens, d_out)
    return update.view(*x.shape[:-1], update.shape[-1])


def mixed_embedding_update(layer, x: torch.Tensor, row_adapters: list[str | None]) -> torch.Tensor | None:
    """Embedding LoRA per row: rows grouped by adapter (embeddings have no matmul to batch)."""
    out = None
    for name in sorted({n for n in row_adapters if n is not BASE and n in layer.r}):
        rows = torch.tensor([i for i, n in enumerate(row_adapters) if n == name], device=x.device)
        after_A = F.embedding(x[rows], layer.lora_embedding_A[name].T)
        update = (after_A @ layer.lora_embedding_B[name].T) * layer.scaling[name]
        if out is None:
            out = update.new_zeros(*x.shape, update.shape[-1])
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
