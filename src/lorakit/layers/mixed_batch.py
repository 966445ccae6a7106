"""Mixed-adapter batches: every row of a batch names its own adapter (or None for the base model).

Per LoRA layer the adapters' factors are stacked once (ranks zero-padded to the largest, scaling
folded into B) and cached per layer and tuple of adapter names, rebuilt when an adapter changes.
Each row gathers its own (A, B) pair and the batch's update is two batched matmuls (bmm), no loop
over adapters. (One GEMM against all adapters' A's side by side, masked per row, was measured too:
faster alone, 15 % slower inside generate on this CPU, so it was dropped.)

The serving engine (serve/scheduler.py) runs inside `fixed_adapters`: its rows join and leave every few steps,
so it uses `masked_linear_update` instead (per adapter of the batch, all rows, others masked; no copy of any
factor: gathered per-row copies cost one adapter's memory per row, measured).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

BASE = None  # a row that uses no adapter
_ENGINE = threading.local()  # set by the serving engine, per thread: `any_form` and `generation` (see below)


@contextmanager
def _engine_setting(name: str, value):
    """`_ENGINE.<name> = value` within the block (this thread), the previous value restored after."""
    before = getattr(_ENGINE, name, None)
    setattr(_ENGINE, name, value)
    try:
        yield
    finally:
        setattr(_ENGINE, name, before)


def any_form_rows():
    """Within the block (this thread), rows whose adapter PEFT cannot mix (DoRA, LoRA with a bias on B) share
    a batch with the others: each such adapter's rows get its own exact update (`mixed_rows_output`).
    PEFT refuses them, so the model API refuses them too outside this block."""
    return _engine_setting("any_form", True)


def fixed_adapters(generation: int):
    """Within the block (this thread), the caller promises that adapter weights change only when `generation`
    does (a server loading / unloading adapters), so the mixed-batch caches are keyed by it instead of each
    tensor's version counter (checked per layer per step otherwise)."""
    return _engine_setting("generation", generation)


def drop_caches(layer) -> None:
    """Forget the layer's mixed-batch caches (they hold factor tensors: an unloaded adapter's memory is freed)."""
    for key in ("_row_plan", "_masked_plan", "_stack_cache", "_gather_cache", "_dora_scale_cache"):
        layer.__dict__.pop(key, None)


def row_plan(layer, row_adapters) -> tuple[tuple, list, list]:
    """(the mixable adapters these rows use (sorted), the rows with every other entry as BASE, the unmixable
    adapters these rows use); memoised per layer for the current rows and adapter set."""
    key = (tuple(row_adapters), tuple(layer.adapters), tuple(a.form.mixable for a in layer.adapters.values()))
    memo = layer.__dict__.get("_row_plan")
    if memo is None or memo[0] != key:
        used = {n for n in row_adapters if n is not BASE and n in layer.adapters}
        mixable = tuple(sorted(n for n in used if layer.adapters[n].form.mixable))
        routed = [n if n in mixable else BASE for n in row_adapters]
        memo = (key, (mixable, routed, sorted(used.difference(mixable))))
        layer.__dict__["_row_plan"] = memo
    return memo[1]


def length_mismatch(row_adapters: list, x: torch.Tensor) -> ValueError:
    """PEFT's error for `adapter_names` that do not name one adapter per batch row."""
    return ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                      f"{len(row_adapters)} and {x.shape[0]} respectively (beam search / num_return_sequences > 1 "
                      "are not supported with adapter_names)")


def check_mixable(layer, names) -> None:
    """Refuse forms whose rows cannot share a batch (DoRA: a weight norm per adapter)."""
    unmixable = {n: layer.adapters[n].form.label for n in names if not layer.adapters[n].form.mixable}
    if unmixable and not getattr(_ENGINE, "any_form", None):
        kinds = sorted(set(unmixable.values()))
        raise ValueError(f"Cannot pass `adapter_names` when {' or '.join(kinds)} is enabled. Mixed-adapter batches do "
                         f"not support {', '.join(kinds)} adapters ({sorted(unmixable)}); merge or serve them alone")


def stacked_factors(layer, names: tuple[str, ...]):
    """(A_stack (n+1, r_max, d_in), B_stack (n+1, d_out, r_max)) in the adapters' dtype (fp32), slot 0 all
    zeros (= base)."""
    # Tensor._version counts in-place writes (optimizer steps, loads), so a stale stack is never used.
    adapters = [layer.adapters[n] for n in names]
    check_mixable(layer, names)
    generation = getattr(_ENGINE, "generation", None)
    key = (names, generation) if generation is not None else \
        tuple((n, layer.factor_versions(n), a.scaling) for n, a in zip(names, adapters))
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
    names, row_adapters, _ = row_plan(layer, row_adapters)
    if not names:
        return None
    generation = getattr(_ENGINE, "generation", None)
    if generation is not None:
        return masked_linear_update(layer, x, names, row_adapters, generation)
    # The update runs in the adapters' fp32 even on a bf16 base: CPU bf16 bmm converts its operands on
    # every call (measured 3x slower than fp32 bmm at decode shapes); x is cast up, the sum cast back.
    A_rows_t, B_rows_t = gathered_factors(layer, names, row_adapters)
    rows = x.reshape(len(row_adapters), -1, x.shape[-1]).to(A_rows_t.dtype)  # (batch, tokens, d_in)
    after_A = torch.bmm(rows, A_rows_t)                                 # (batch, tokens, r_max)
    update = torch.bmm(after_A, B_rows_t)                               # (batch, tokens, d_out)
    return update.view(*x.shape[:-1], update.shape[-1])


def masked_linear_update(layer, x: torch.Tensor, names: tuple, row_adapters: list, generation: int) -> torch.Tensor:
    """The serving engine's form of `mixed_linear_update`: per adapter in the batch, s·B A x over all rows with
    the other rows masked to zero; no stacked or gathered copy of any factor (rows join and leave the batch
    every few steps, and per-row copies of the factors cost as much memory as one adapter per row)."""
    key = (tuple(row_adapters), generation)
    memo = layer.__dict__.get("_masked_plan")
    if memo is None or memo[0] != key:
        plan = []
        for name in names:
            A, B, s = layer.effective_factors(name)
            mask = torch.tensor([[float(n == name)] for n in row_adapters], dtype=A.dtype, device=A.device)
            plan.append((A.T, B.T, (mask * s)[:, :, None]))  # (batch, 1, 1): the row's scale, or 0
        memo = (key, plan)
        layer.__dict__["_masked_plan"] = memo
    rows = x.reshape(len(row_adapters), -1, x.shape[-1])
    rows = rows.to(memo[1][0][0].dtype)  # fp32 adapters on a bf16 base: computed in fp32 (see above)
    update = None
    for A_t, B_t, scale in memo[1]:
        part = torch.matmul(torch.matmul(rows, A_t) * scale, B_t)
        update = part if update is None else update.add_(part)
    return update.view(*x.shape[:-1], update.shape[-1])


def mixed_grouped_update(layer, x: torch.Tensor, row_adapters: list[str | None]) -> torch.Tensor | None:
    """Embedding and convolution LoRA per row: rows grouped by adapter (no single matmul to batch); each group's
    update is the layer's own single-adapter update, base rows get zeros."""
    if x.shape[0] != len(row_adapters):
        raise length_mismatch(row_adapters, x)
    names, _, _ = row_plan(layer, row_adapters)
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
    names = list(names)  # one list for every layer
    for layer in layers:
        layer.row_adapters = names
    try:
        yield
    finally:
        for layer in layers:
            layer.row_adapters = None


def mixed_rows_output(layer, x: torch.Tensor, row_adapters: list[str | None], result: torch.Tensor,
                      update: torch.Tensor | None) -> torch.Tensor:
    """base `result` + the mixable rows' `update`, and the rows of unmixable adapters given each adapter's own
    output for them (in `any_form_rows` only). A DoRA linear layer in eval mode uses its magnitude / weight-norm
    factor cached per adapter version: a fixed per-channel scale, so no weight is formed per step."""
    _, _, names = row_plan(layer, row_adapters)
    result = result if update is None else (result + update).to(result.dtype)
    if not names:
        return result
    check_mixable(layer, names)
    batch = len(row_adapters)
    rows_x = x if x.shape[0] == batch else x.reshape(batch, -1, *x.shape[1:])  # (tokens, d) flattened rows
    rows_result = result if result.shape[0] == batch else result.reshape(batch, -1, *result.shape[1:])
    out = rows_result.clone()
    for name in names:
        rows = torch.tensor([i for i, n in enumerate(row_adapters) if n == name], device=x.device)
        if layer.geometry == "linear" and layer.adapters[name].form.label == "DoRA" and not layer.training:
            out[rows] = dora_linear_rows(layer, name, rows_x[rows], rows_result[rows]).to(out.dtype)
        else:
            out[rows] = layer.adapters[name].form.update(layer, name, rows_x[rows], rows_result[rows]).to(out.dtype)
    return out.view(result.shape)


def dora_linear_rows(layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """DoRA at inference: result + (m/n - 1)·(W x) + (m/n)·s·B A x, with m/n cached (layer, adapter version)."""
    from ..variants.dora import dora_update, magnitude_scale, weight_norm  # variants import layers: a cycle at the top

    magnitude = layer.lora_magnitude_vector[name]
    generation = getattr(_ENGINE, "generation", None)
    key = (name, generation) if generation is not None else \
        (name, layer.factor_versions(name), id(magnitude), magnitude._version)
    cached = layer.__dict__.get("_dora_scale_cache", {}).get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            weight = layer.oriented_weight().to(torch.float32)
            scale = magnitude_scale(magnitude, weight_norm(weight, layer.norm_delta(name)), 0).float()
        cached = (key, scale)
        layer.__dict__.setdefault("_dora_scale_cache", {})[name] = cached
    A, B, s = layer.effective_factors(name)
    base_out = result.to(torch.float32)
    bias = getattr(layer.base_layer, "bias", None)
    if bias is not None:
        base_out = base_out - bias.float()
    lora_out = layer.lowrank(x.to(A.dtype), name, A, B).float()
    return result + dora_update(base_out, lora_out, cached[1], s)
