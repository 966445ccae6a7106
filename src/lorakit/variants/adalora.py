"""AdaLoRA's rank allocation (Zhang et al. 2023), with PEFT's exact semantics.

Each adapted matrix is ΔW = B diag(E) A. After every optimizer step the allocator
  1. scores every parameter by sensitivity |p · ∂L/∂p|, smoothed (β1) and with its uncertainty (β2);
  2. scores each singular triplet i as score(E_i) + mean score of row A_i + mean score of column B_i;
  3. keeps the `budget` best triplets over all layers and zeroes the other E_i.
Budget: init_r·n for `tinit` steps, cubic decay to target_r·n at step total_step - tfinal, where the
mask is frozen (`config.rank_pattern`) and re-applied every step until the end.
"""

from __future__ import annotations

import torch


def triplets(model, adapter_name: str):
    """(key, layer) for every layer holding AdaLoRA adapter `adapter_name`; key = '<module>.lora_E'."""
    from ..layers import LoraLinear

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [(f"{name}.lora_E", layer) for name, layer in base.named_modules()
            if isinstance(layer, LoraLinear) and layer.kind.get(adapter_name) == "adalora"]


def orthogonal_regularization(model, adapter_name: str) -> torch.Tensor:
    """Mean over A and B matrices of ||P Pᵀ - I||_F (A rows, B columns orthonormal)."""
    terms = []
    for _, layer in triplets(model, adapter_name):
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        for cov in (A @ A.T, B.T @ B):
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


class RankAllocator:
    """Importance-based singular-value masking; call `update_and_allocate(model, step)` after each optimizer step
    (before zero_grad). Writes the kept triplets to `model.peft_config[adapter_name].rank_pattern`."""

    def __init__(self, model, adapter_name: str):
        self.adapter_name = adapter_name
        self.config = model.peft_config[adapter_name]
        if self.config.adapter_kind != "adalora":
            raise ValueError(f"adapter {adapter_name!r} is not an AdaLoRA adapter")
        if self.config.total_step is None:
            raise ValueError("AdaLoRA needs total_step to schedule its rank budget")
        self.layers = triplets(model, adapter_name)
        self.init_budget = sum(layer.r[adapter_name] for _, layer in self.layers)
        self.target_budget = self.config.target_r * len(self.layers)
        self.reset()

    def reset(self) -> None:
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}

    def _params(self):
        name = self.adapter_name
        for key, layer in self.layers:
            yield key, "A", layer.lora_A[name].weight
            yield key, "B", layer.lora_B[name].weight
            yield key, "E", layer.lora_E[name]

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * progress ** 3 + self.target_budget)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for key, part, p in self._params():
            if p.grad is None:
                continue
            k = (key, part)
            if k not in self.ipt:
                self.exp_avg_ipt[k] = torch.zeros_like(p)
                self.exp_avg_unc[k] = torch.zeros_like(p)
            self.ipt[k] = (p * p.grad).abs()
            self.exp_avg_ipt[k] = b1 * self.exp_avg_ipt[k] + (1 - b1) * self.ipt[k]
            self.exp_avg_unc[k] = b2 * self.exp_avg_unc[k] + (1 - b2) * (self.ipt[k] - self.exp_avg_ipt[k]).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Per layer key: one score per singular triplet, shape (r,)."""
        score = {k: self.exp_avg_ipt[k] * self.exp_avg_unc[k] for k in self.exp_avg_ipt}
        out = {}
        for key, _ in self.layers:
            if (key, "E") not in score:
                continue
            out[key] = (score[(key, "E")].view(-1) + score[(key, "A")].mean(dim=1)
                        + score[(key, "B")].mean(dim=0))
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        scores = self.triplet_scores()
        k = self.init_budget - budget
        if k <= 0 or not scores:
            return {}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        pattern = {}
        for key, layer in self.layers:
            keep = scores[key] > threshold
            layer.lora_E[self.adapter_name].masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[key] = keep.tolist()
        return pattern

    @torch.no_grad()
    def apply_rank_pattern(self) -> None:
        for key, layer in self.layers:
            keep = torch.tensor(self.config.rank_pattern[key], device=layer.lora_E[self.adapter_name].device)
            layer.lora_E[self.adapter_name].masked_fill_(~keep.view(-1, 1), 0.0)

    def update_and_allocate(self, model, step: int) -> int:
        """One schedule step (PEFT's `update_and_allocate`); returns the current budget."""
        c = self.config
        final = c.total_step - c.tfinal
        budget, mask_now = self.budget_schedule(step)
        if step < final:
            self.update_importance()
            if mask_now:
                pattern = self.mask_to_budget(budget)
                if pattern:
                    c.rank_pattern = pattern
        elif step == final:
            c.rank_pattern = self.mask_to_budget(budget) or c.rank_pattern
            self.reset()
        elif c.rank_pattern:
            self.apply_rank_pattern()
        return budget
