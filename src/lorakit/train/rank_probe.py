"""Layer-wise rank from a short AdaLoRA-style importance probe.

`suggest_rank_pattern(model, budget, batches)` attaches a temporary AdaLoRA adapter (rank `max_rank`
on every target), trains it for a few steps, scores every singular triplet with AdaLoRA's smoothed
sensitivity x uncertainty, and then spends the parameter budget greedily on the best triplets,
each costing d_in + d_out parameters (what one rank of plain LoRA costs on that matrix). Every
target keeps at least rank 1. The model is returned untouched; the result is a `rank_pattern`
for LoraConfig.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..adapters.task_models import get_peft_model
from ..variants.adalora import AdaLoraConfig, RankAllocator


def allocate(scores: dict[str, torch.Tensor], costs: dict[str, int], budget: int) -> dict[str, int]:
    """Greedy: every module gets rank 1, then the highest-scoring remaining triplets while the budget lasts.

    >>> allocate({"a": torch.tensor([3., 2., 1.]), "b": torch.tensor([5., .5, .1])}, {"a": 10, "b": 10}, 50)
    {'a': 3, 'b': 2}
    """
    ranks = {name: 1 for name in scores}
    spent = sum(costs.values())
    if spent > budget:
        raise ValueError(f"budget {budget:,} parameters is below rank 1 on every target ({spent:,} parameters); "
                         "raise the budget or target fewer modules")
    rest = sorted(((float(s), name) for name, row in scores.items() for s in row.sort(descending=True).values[1:]),
                  key=lambda t: -t[0])
    for _, name in rest:
        if spent + costs[name] <= budget:
            ranks[name] += 1
            spent += costs[name]
    return ranks


def suggest_rank_pattern(model: nn.Module, budget: int, batches, target_modules: list[str] | str,
                         max_rank: int = 32, probe_steps: int = 8, lr: float = 5e-3, loss_fn=None) -> dict[str, int]:
    """{module name: rank} whose LoRA parameters total at most `budget`, ranked by AdaLoRA importance.

    `batches`: an iterable of dicts for `model(**batch)` (with `labels`, or pass `loss_fn(model, batch)`),
    cycled for `probe_steps` optimizer steps on a deep copy of `model`.
    """
    if budget <= 0:
        raise ValueError(f"budget must be a positive number of parameters, got {budget!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("suggest_rank_pattern needs at least one batch to probe importance")
    probe = get_peft_model(copy.deepcopy(model), AdaLoraConfig(
        init_r=max_rank, target_r=1, tinit=0, tfinal=0, total_step=probe_steps + 1, lora_alpha=max_rank,
        target_modules=target_modules, orth_reg_weight=0.0))
    probe.train()
    allocator = RankAllocator(probe, "default")
    params = [p for p in probe.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    for step in range(probe_steps):
        batch = batches[step % len(batches)]
        loss = loss_fn(probe, batch) if loss_fn is not None else probe(**batch).loss
        loss.backward()
        optimizer.step()
        allocator.update_importance()  # scores only: no masking during the probe
        optimizer.zero_grad(set_to_none=True)
    scores = {key.removesuffix(".lora_E"): s for key, s in allocator.triplet_scores().items()}
    costs = {key.removesuffix(".lora_E"): layer.in_features + layer.out_features for key, layer in allocator.layers}
    return allocate(scores, costs, budget)
