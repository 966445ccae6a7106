"""VeRA's shared random projections (Kopiczko et al. 2024).

One frozen pair per adapter, A (r, max d_in) and B (max d_out, r), drawn from a CPU generator
seeded with `projection_prng_key` exactly as PEFT draws them (Kaiming-uniform, A first), so an
adapter saved without its projections regenerates the same matrices in either library.
Each layer uses the top-left slice that fits its shape. Per layer, VeRA trains two vectors:
ΔW = diag(λ_b) B diag(λ_d) A (λ_b (d_out,) starts at 0, λ_d (r,) at d_initial); no alpha, s = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..layers.form import AdapterForm
from .default_targets import VERA_DEFAULTS
from .lora_config import LoraConfig

PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1] (a = 0 Kaiming, as PEFT's VeRA)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections:
    """The frozen (A, B) pair one VeRA adapter shares across all its layers (not a parameter of any layer)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        self.A, self.B = A, B

    @classmethod
    def generate(cls, r: int, max_in: int, max_out: int, seed: int) -> "VeraProjections":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        A = kaiming_uniform((r, max_in), gen)
        B = kaiming_uniform((max_out, r), gen)
        return cls(A, B)

    def check_fits(self, in_features: int, out_features: int, r: int) -> None:
        if self.A.shape[1] < in_features or self.B.shape[0] < out_features or self.A.shape[0] < r:
            raise ValueError(f"VeRA projections A {tuple(self.A.shape)} / B {tuple(self.B.shape)} are too small for "
                             f"a layer with d_in={in_features}, d_out={out_features}, r={r}")

    def load(self, A: torch.Tensor, B: torch.Tensor, source: str) -> None:
        """Take projections stored in an adapter file (they must have this adapter's shapes)."""
        for name, mine, theirs in (("vera_A", self.A, A), ("vera_B", self.B, B)):
            if tuple(mine.shape) != tuple(theirs.shape):
                raise ValueError(f"{source}: {name} has shape {tuple(theirs.shape)}, this model's targets need "
                                 f"{tuple(mine.shape)}; was the adapter trained on another model?")
        self.A.copy_(A)
        self.B.copy_(B)


class VeraForm(AdapterForm):
    label = "VERA"
    geometries = ("linear",)

    def __init__(self, projections: VeraProjections, d_initial: float, init_weights: bool, save_projection: bool):
        self.projections, self.d_initial = projections, d_initial
        self.init_weights, self.save_projection = init_weights, save_projection

    def scaling(self, r, lora_alpha):
        return 1.0

    def create(self, layer, name):
        r = layer.adapters[name].r
        self.projections.check_fits(layer.in_features, layer.out_features, r)
        layer.add_param("vera_lambda_b", name, torch.ones(layer.out_features))
        layer.add_param("vera_lambda_d", name, torch.randn(r))
        if self.init_weights:
            torch.nn.init.constant_(layer.vera_lambda_d[name], self.d_initial)
            torch.nn.init.zeros_(layer.vera_lambda_b[name])

    def factors(self, layer, name):
        proj = self.projections
        A = layer.vera_lambda_d[name][:, None] * proj.A[:, : layer.in_features]
        B = layer.vera_lambda_b[name][:, None] * proj.B[: layer.out_features]
        return A, B, 1.0

    def tensors(self, layer, name):
        return [layer.vera_lambda_d[name], layer.vera_lambda_b[name], self.projections.A, self.projections.B]

    def saved_tensors(self):
        return dict(zip(PROJECTION_KEYS, (self.projections.A, self.projections.B))) if self.save_projection else {}

    def saved_keys(self):
        return PROJECTION_KEYS

    def load_saved_tensors(self, tensors, source):
        if not tensors:
            return  # saved without projections: regenerated from projection_prng_key
        if sorted(tensors) != sorted(PROJECTION_KEYS):
            raise ValueError(f"{source}: has VeRA projections {sorted(tensors)} but needs both {PROJECTION_KEYS}")
        self.projections.load(*(tensors[k] for k in PROJECTION_KEYS), source=source)


@dataclass
class VeraConfig(LoraConfig):
    """VeRA (Kopiczko et al. 2024): frozen random A/B shared by all layers, trainable vectors λ_d (r) and λ_b
    (d_out) per layer. PEFT's VeraConfig fields; A and B are regenerated from `projection_prng_key`, and
    written into the file too when `save_projection`. Targets of different shapes share one projection
    sized to the largest, sliced per layer (as in PEFT).

    >>> VeraConfig(r=256, target_modules=["q_proj", "v_proj"]).peft_type
    'VERA'
    """

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    init_weights: bool = True
    peft_type: str = "VERA"

    PEFT_TYPE = "VERA"
    PREFIX = "vera_lambda_"
    DEFAULT_TARGETS = VERA_DEFAULTS
    FIELD_TYPES = {**LoraConfig.FIELD_TYPES, "projection_prng_key": ((int,), "an integer"),
                   "save_projection": ((bool,), "true or false"), "init_weights": ((bool,), "true or false"),
                   "vera_dropout": ((int, float), "a number in [0, 1)"), "d_initial": ((int, float), "a number > 0")}
    SAVED = ("r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
             "fan_in_fan_out", "bias", "modules_to_save", "init_weights", "layers_to_transform", "layers_pattern",
             "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_type")

    def __post_init__(self):
        self.lora_dropout = self.vera_dropout
        super().__post_init__()

    def validate(self) -> None:
        """Check VeRA's settings: one shared rank, no alpha, DoRA, rsLoRA or patterns; d_initial > 0."""
        super().validate()
        if self.use_dora or self.use_rslora or self.rank_pattern or self.alpha_pattern or self.svd_init:
            raise ValueError("VeRA has one shared rank and no alpha: use_dora, use_rslora, rank_pattern, "
                             "alpha_pattern and PiSSA/OLoRA init do not apply to a VeraConfig")
        if not isinstance(self.d_initial, (int, float)) or self.d_initial <= 0:
            raise ValueError(f"d_initial must be a number > 0, got {self.d_initial!r}")

    def adapter_form(self, target_shapes: list[tuple[int, int]]) -> VeraForm:
        """The form holding this adapter's shared random projections, sized for the largest target."""
        projections = VeraProjections.generate(self.r, max(i for i, _ in target_shapes),
                                               max(o for _, o in target_shapes), self.projection_prng_key)
        return VeraForm(projections, self.d_initial, self.init_weights, self.save_projection)

    def layer_kwargs(self, module_name: str) -> dict[str, Any]:
        """What each VeRA layer is built with: the shared rank, scale 1 and vera_dropout."""
        return dict(r=self.r, lora_alpha=1.0, lora_dropout=self.vera_dropout)

    def _saved_fields(self) -> list[str]:
        return list(self.SAVED)
