"""AdaLoRA (Zhang et al. 2023) with PEFT's exact semantics: its config and its rank allocation (the layer side,
its form, is in adalora_form.py).

Each adapted matrix is ΔW = s·B diag(E) A, s = alpha / init_r. After every optimizer step the allocator
  1. scores every parameter by sensitivity |p · ∂L/∂p|, smoothed (β1) and with its uncertainty (β2);
  2. scores each singular triplet i as score(E_i) + mean score of row A_i + mean score of column B_i;
  3. keeps the `budget` best triplets over all layers and zeroes the other E_i.
Budget: init_r·n for `tinit` steps, cubic decay to target_r·n at step total_step - tfinal, where the
mask is frozen (`config.rank_pattern`) and re-applied every step until the end.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..utils import check_positive_int
from .adalora_form import AdaLoraForm, orthogonal_regularization, pattern_module, resize_by_rank_pattern, triplets
from .default_targets import ADALORA_DEFAULTS
from .lora_config import LoraConfig


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA: ΔW = B diag(E) A in SVD form, ranks pruned from init_r to an average of target_r by
    importance while training. PEFT's AdaLoraConfig fields. Schedule: `tinit` warm-up steps at full rank,
    budget shrinks cubically until `total_step - tfinal`, then ranks are fixed. `rank_pattern` (written by
    training) maps '<module>.lora_E' to the kept singular values (list of bools).
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    peft_type: str = "ADALORA"

    PEFT_TYPE = "ADALORA"
    DEFAULT_TARGETS = ADALORA_DEFAULTS
    resumable = False  # its importance scores are not checkpointed
    FIELD_TYPES = {**LoraConfig.FIELD_TYPES,
                   **{name: ((int,), "an integer") for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT")},
                   **{name: ((int, float), "a number") for name in ("beta1", "beta2", "orth_reg_weight")},
                   "total_step": ((int, type(None)), "an integer > 0 (the number of optimizer steps)")}

    def validate(self) -> None:
        """Check AdaLoRA's settings (ranks, schedule, total_step, betas); ValueError naming the bad value."""
        patterns, self.rank_pattern = self.rank_pattern, {}
        try:
            super().validate()
        finally:
            self.rank_pattern = patterns or None
        for key, mask in (self.rank_pattern or {}).items():
            if not isinstance(mask, (list, tuple)) or not all(isinstance(b, (bool, int)) for b in mask):
                raise ValueError(f"rank_pattern[{key!r}] must be a list of booleans (the kept singular values), "
                                 f"got {mask!r}")
        for name in ("tinit", "tfinal"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.use_dora or self.svd_init or self.alpha_pattern:
            raise ValueError(f"{self.PEFT_TYPE} does not support DoRA (nor PiSSA/OLoRA init or alpha_pattern): AdaLoRA "
                             "has its own SVD form")
        check_positive_int("init_r", self.init_r)
        check_positive_int("target_r", self.target_r)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must be <= init_r ({self.init_r})")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"`orth_reg_weight` should be greater than or equal to 0, but the value passed is "
                             f"{self.orth_reg_weight}")
        if self.total_step is None or isinstance(self.total_step, bool) or not isinstance(self.total_step, int) \
                or self.total_step <= 0:
            raise ValueError("AdaLoRA does not work when `total_step` is None, supply a value > 0 (the number of "
                             f"optimizer steps; got {self.total_step!r}).")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError("The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/"
                             f"`tinit` or increase `total_step` (tinit={self.tinit}, tfinal={self.tfinal}, "
                             f"total_step={self.total_step}: need tinit < total_step - tfinal).")
        if self.deltaT < 1:
            raise ValueError(f"deltaT must be >= 1, got {self.deltaT!r}")

    def __post_init__(self):
        rank_pattern = self.rank_pattern
        if self.r != 8:  # LoraConfig's default
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored. If you intended to set the "
                          "initial rank, use `init_r` instead.")
        super().__post_init__()
        self.rank_pattern = {k: list(v) for k, v in rank_pattern.items()} if rank_pattern else None

    def rank_for(self, module_name: str) -> int:
        """The rank module `module_name` starts with: init_r, or the kept count of its rank_pattern mask."""
        masks = [m for k, m in (self.rank_pattern or {}).items() if pattern_module(k) == module_name]
        return self.init_r if not masks else int(sum(masks[0]))

    def to_dict(self):
        """Saved without the adapter name in rank_pattern keys, as PEFT saves it."""
        out = super().to_dict()
        if out.get("rank_pattern"):
            out["rank_pattern"] = {f"{pattern_module(k)}.lora_E": v for k, v in out["rank_pattern"].items()}
        return out

    def adapter_form(self, target_shapes: list[tuple[int, int]]) -> AdaLoraForm:
        """The form that creates and applies AdaLoRA's (A, E, B) triplets on each target."""
        return AdaLoraForm(self)

    @classmethod
    def run_settings(cls, settings, total_steps):
        """total_step defaults to the run's number of optimizer steps (a stand-in that allows a budgeting phase
        while the settings are checked, before that number is known)."""
        if settings.get("total_step") is not None:
            return settings
        stand_in = settings.get("tinit", cls.tinit) + settings.get("tfinal", cls.tfinal) + 1
        return {**settings, "total_step": total_steps or stand_in}

    single_trainable = True

    def resize_by_rank_pattern(self, model, rank_pattern, adapter_name):
        """Shrink each target to the singular values `rank_pattern` keeps (PEFT's resize_modules_by_rank_pattern)."""
        resize_by_rank_pattern(model, rank_pattern, adapter_name)

    @property
    def regularization_weight(self) -> float:
        """Weight of the orthogonality regulariser in the training loss (orth_reg_weight)."""
        return self.orth_reg_weight

    def regularization(self, model, adapter_name: str) -> torch.Tensor:
        """The orthogonality regulariser ||AᵀA - I||² + ||BBᵀ - I||² summed over the adapter's layers."""
        return orthogonal_regularization(model, adapter_name)

    def step_callback(self, model, adapter_name: str):
        """RankAllocator's update_and_allocate: importance and budget masking after each optimizer step."""
        return RankAllocator(model, adapter_name).update_and_allocate


class RankAllocator:
    """Importance-based singular-value masking; call `update_and_allocate(model, step)` after each optimizer step
    (before zero_grad). Writes the kept triplets to `model.peft_config[adapter_name].rank_pattern`."""

    def __init__(self, model, adapter_name: str):
        self.adapter_name = adapter_name
        self.config = model.peft_config[adapter_name]
        if not isinstance(self.config, AdaLoraConfig):
            raise ValueError(f"adapter {adapter_name!r} is not an AdaLoRA adapter")
        if self.config.total_step is None:
            raise ValueError("AdaLoRA needs total_step to schedule its rank budget")
        self.layers = triplets(model, adapter_name)
        self.init_budget = sum(layer.adapters[adapter_name].r for _, layer in self.layers)
        self.target_budget = self.config.target_r * len(self.layers)
        self.reset()

    def reset(self) -> None:
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}

    def _params(self):
        name = self.adapter_name
        for key, layer in self.layers:
            A, B = layer.pair(name)
            yield key, "A", A
            yield key, "B", B
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
            pattern[f"{key}.{self.adapter_name}"] = keep.tolist()  # PEFT's keys while training
        return pattern

    @torch.no_grad()
    def apply_rank_pattern(self) -> None:
        masks = {pattern_module(k): m for k, m in self.config.rank_pattern.items()}
        for key, layer in self.layers:
            keep = torch.tensor(masks[pattern_module(key)], device=layer.lora_E[self.adapter_name].device)
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
