"""Adapter arithmetic: combine adapters into a new one (PEFT's `add_weighted_adapter` semantics),
and shrink an adapter's rank by truncated SVD.

Combination types (PEFT's definitions):
  linear, ties, dare_linear, dare_ties, magnitude_prune — applied to A and B separately, adapter i
      weighted by sqrt(|w_i * s_i|) (A also carries the sign); all ranks must be equal;
  cat — A and B concatenated along the rank (A rows scaled by w_i * s_i); rank = sum of ranks;
  svd (and ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd) — combine the full
      ΔW_i = s_i B_i A_i, then keep the top `svd_rank` singular directions.
The new adapter has lora_alpha = r, so its scaling is 1.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from ..layers import LoraConv, LoraLayer, ModulesToSaveWrapper
from ..variants.lora_config import LoraConfig

TYPES = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties",
         "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")


# --- task-vector math on stacked tensors (pure functions) ------------------------------------
def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return tensors * weights.view(-1, *([1] * (tensors.dim() - 1)))


def magnitude_prune_tensor(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest-magnitude entries."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[t.abs().reshape(-1).topk(k).indices] = 1
    return t * mask.view(t.shape)


def random_prune_tensor(t: torch.Tensor, density: float, generator=None) -> torch.Tensor:
    """DARE: drop entries with probability 1 - density and rescale the survivors by 1 / density."""
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    sign = stacked.sign()
    votes = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == torch.where(votes >= 0, 1, -1)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (weighted * mask).sum(0) / mask.sum(0).clamp(min=1)


def combine(tensors: list[torch.Tensor], weights: torch.Tensor, kind: str, density: float = 1.0,
            sign_method: str = "total", generator=None) -> torch.Tensor:
    """One combined tensor from per-adapter tensors (the `kind` without any `_svd` suffix)."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune_tensor(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [random_prune_tensor(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = _weighted(stacked, weights.to(stacked.dtype))
    if kind in ("ties", "dare_ties"):
        return disjoint_merge(weighted, majority_sign_mask(stacked, sign_method))
    return weighted.sum(0)


# --- on a LoraModel ------------------------------------------------------------------------------
def _factors(layer, name):
    """(A, B, s) of adapter `name` in `layer` with ΔW = s * B @ A, or None. For plain LoRA (the only form
    arithmetic accepts) A and B are the parameters themselves, so writing into them sets the adapter."""
    if name not in layer.adapters:
        return None
    if layer.adapters[name].form.output_bias(layer, name) is not None:
        raise ValueError(f"adapter {name!r} has lora_bias=True: its bias term has no low-rank factors, so adapter "
                         "arithmetic (add_weighted_adapter, resizing) cannot combine it")
    return layer.effective_factors(name)


def _require_plain_lora(model, name: str) -> None:
    config = model.peft_config[name]
    if type(config) is not LoraConfig:  # PEFT's AdaLoraModel raises TypeError here too
        raise TypeError(f"adapter {name!r} is a {config.PEFT_TYPE} adapter: {config.PEFT_TYPE} models do not "
                        "support add_weighted_adapter (adapter arithmetic works on plain LoRA adapters)")
    if config.use_dora:
        kind = "DoRA"
        raise ValueError(f"adapter {name!r} is a {kind} adapter; adapter arithmetic works on plain LoRA adapters")
    if config.target_parameters:  # PEFT refuses these too: the experts' factors are interleaved per expert
        raise ValueError(f"adapter arithmetic does not support targeting nn.Parameter (adapter {name!r} has "
                         f"target_parameters={config.target_parameters}), as in PEFT")


def _lora_layers(model):
    layers = [(n, m) for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)]
    return [(n, m) for n, m in layers if not isinstance(m, LoraConv)]


def add_weighted_adapter(model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, density: float | None = None,
                         majority_sign_method: str = "total", svd_clamp: float | None = None, seed: int = 0) -> None:
    """Create adapter `adapter_name` from a weighted combination of `adapters` (see module doc)."""
    for name in adapters:
        model._check_known(name)
        _require_plain_lora(model, name)
    if adapter_name in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists")
    if combination_type not in TYPES:
        raise ValueError(f"combination_type (merge-adapters --type) must be one of {TYPES}, got {combination_type!r}")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters")
    needs_density = combination_type.split("_svd")[0] in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
    if needs_density and (density is None or not 0 < density <= 1):
        raise ValueError(f"{combination_type} needs density (merge-adapters --density) in (0, 1], got {density!r}")
    if len(adapters) == 1 and combination_type not in ("cat", "svd"):
        combination_type = "linear"
    ranks = [model.peft_config[a].r for a in adapters]
    layers = _lora_layers(model)
    if combination_type in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        if len(set(ranks)) != 1:
            raise ValueError(f"{combination_type} needs adapters of equal rank, got {ranks}; use 'cat' or 'svd'")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    targets = sorted(n for n, m in layers if any(_factors(m, a) is not None for a in adapters))
    layer_ranks = _combined_ranks(layers, adapters, combination_type, new_rank)
    copies = _module_copy_sources(model, adapters)
    other_ranks = {f"^{re.escape(n)}$": r for n, r in layer_ranks.items() if r != new_rank}
    model.add_adapter(adapter_name, LoraConfig(  # alpha = r in every layer: scaling 1, the weights are in A and B
        r=new_rank, lora_alpha=new_rank, target_modules=targets, modules_to_save=sorted(copies) or None,
        rank_pattern=other_ranks, alpha_pattern=dict(other_ranks)))
    for name, source in copies.items():  # the one trained copy of the module (PEFT's rule)
        copy_of = model.get_base_model().get_submodule(name).modules_to_save
        copy_of[adapter_name].load_state_dict(copy_of[source].state_dict())
    gen = torch.Generator().manual_seed(seed)
    for name, layer in layers:
        present = [(a, w) for a, w in zip(adapters, weights) if _factors(layer, a) is not None]
        if not present:
            continue
        A_new, B_new, _ = _factors(layer, adapter_name)
        with torch.no_grad():
            A_new.zero_()
            B_new.zero_()
            A, B = _combine_layer(layer, present, combination_type, new_rank, density, majority_sign_method,
                                  svd_clamp, gen)
            A_new[: A.shape[0]].copy_(A)
            B_new[:, : B.shape[1]].copy_(B)


def _combined_ranks(layers, adapters: list[str], kind: str, new_rank: int) -> dict[str, int]:
    """{layer: the combined adapter's rank there}: per-layer ranks (rank_pattern) can differ from the configs' r.
    Elementwise combinations need one rank per layer across the adapters; 'cat' sums them; SVD kinds use new_rank."""
    out = {}
    for name, layer in layers:
        ranks = [f[0].shape[0] for f in (_factors(layer, a) for a in adapters) if f is not None]
        if not ranks:
            continue
        if kind == "cat":
            out[name] = sum(ranks)
        elif kind.endswith("svd"):
            out[name] = new_rank
        elif len(set(ranks)) > 1:
            raise ValueError(f"combination_type={kind!r} (--type {kind}) needs the adapters to have one rank per "
                             f"layer, but layer {name!r} has ranks {ranks} (rank_pattern); use 'cat' or 'svd'")
        else:
            out[name] = ranks[0]
    return out


def _module_copy_sources(model, adapters: list[str]) -> dict[str, str]:
    """{modules_to_save module: the adapter whose trained copy the combination takes}. Copies replace a module
    rather than add up, so two adapters with a copy of one module cannot be combined (as in PEFT)."""
    wrappers = [(n, m) for n, m in model.get_base_model().named_modules() if isinstance(m, ModulesToSaveWrapper)]
    holders = {n: [a for a in adapters if a in m.modules_to_save] for n, m in wrappers}
    clashes = {n: h for n, h in holders.items() if len(h) > 1}
    if clashes:
        raise ValueError(f"Cannot add weighted adapters if they target the same module with modules_to_save, but "
                         f"found {len(clashes)} such instance(s). ({clashes}: module copies replace the module, "
                         "they cannot be weighted)")
    return {n: h[0] for n, h in holders.items() if h}


def _combine_layer(layer, present, kind, new_rank, density, sign_method, clamp, gen):
    factors = [(_factors(layer, a)[:2], w * _factors(layer, a)[2]) for a, w in present]
    if kind == "cat":
        return (torch.cat([A * ws for (A, _), ws in factors]), torch.cat([B for (_, B), _ in factors], dim=1))
    if kind.endswith("svd"):
        deltas = [ws * (B.float() @ A.float()) for (A, B), ws in factors]
        base_kind = "linear" if kind == "svd" else kind[: -len("_svd")]
        delta = combine(deltas, torch.ones(len(deltas)), base_kind, density or 1.0, sign_method, gen)
        return svd_factors(delta, new_rank, clamp)[:2]
    w_a = torch.tensor([math.copysign(math.sqrt(abs(ws)), ws) for _, ws in factors])
    w_b = torch.tensor([math.sqrt(abs(ws)) for _, ws in factors])
    A = combine([A for (A, _), _ in factors], w_a, kind, density or 1.0, sign_method, gen)
    B = combine([B for (_, B), _ in factors], w_b, kind, density or 1.0, sign_method, gen)
    return A, B


def svd_factors(delta: torch.Tensor, rank: int, clamp: float | None = None):
    """(A, B, all singular values of delta) with B @ A the best rank-`rank` approximation of delta."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    B = U[:, :rank] @ torch.diag(S[:rank])
    A = Vh[:rank]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        A, B = A.clamp(-hi, hi), B.clamp(-hi, hi)
    return A, B, S


def resize_adapter(model, name: str, new_r: int) -> float:
    """Re-factor adapter `name` at rank `new_r` by truncated SVD of each ΔW; returns the fraction of
    ΔW's energy (sum of squared singular values, over all layers) that is kept."""
    model._check_known(name)
    _require_plain_lora(model, name)
    if isinstance(new_r, bool) or not isinstance(new_r, int) or new_r < 1:
        raise ValueError(f"new_r must be an integer >= 1, got {new_r!r}")
    config = model.peft_config[name]
    kept = total = 0.0
    new = {}
    for layer_name, layer in _lora_layers(model):
        f = _factors(layer, name)
        if f is None:
            continue
        A, B, s = f
        if new_r > min(B.shape[0], A.shape[1]):
            raise ValueError(f"new_r {new_r} exceeds the dimensions of {layer_name} ({B.shape[0]}x{A.shape[1]})")
        delta = s * (B.detach().float() @ A.detach().float())
        A2, B2, s = svd_factors(delta, new_r)
        kept += s[:new_r].square().sum().item()
        total += s.square().sum().item()
        new[layer_name] = (A2, B2)
    active = model.active_adapters
    model.delete_adapter(name)
    model.add_adapter(name, dataclasses.replace(config, r=new_r, lora_alpha=new_r, rank_pattern={}, alpha_pattern={},
                                                target_modules=sorted(new)))
    layers = dict(_lora_layers(model))
    with torch.no_grad():
        for layer_name, (A2, B2) in new.items():
            A, B, _ = _factors(layers[layer_name], name)
            A.copy_(A2)
            B.copy_(B2)
    if name in active or not model.active_adapters:
        model.set_adapter(active or [name])
    return kept / total if total else 1.0
