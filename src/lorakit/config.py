"""LoraConfig: the adapter configuration, field for field PEFT's LoraConfig.

Saved as `adapter_config.json`, loadable by PEFT; PEFT's files load here too. Unknown
fields in a loaded file are kept (so they survive a round trip) and ignored with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "adapter_config.json"
INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")
BIAS_CHOICES = ("none", "all", "lora_only")
# PEFT fields we do not implement, with the value that means "feature off": such entries are silent.
PEFT_INERT_FIELDS = {"auto_mapping": None, "peft_version": None, "megatron_config": None,
                     "megatron_core": "megatron.core", "qalora_group_size": 16, "use_qalora": False,
                     "lora_bias": False, "ensure_weight_tying": False, "use_bdlora": None}
TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter (PEFT's field names and meanings).

    >>> cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    >>> cfg.r
    16
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    bias: str = "none"
    task_type: str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_type: str = "LORA"
    # Fields we do not interpret, kept from a loaded file so saving preserves them.
    extra_fields: dict[str, Any] = field(default_factory=dict, repr=False)

    PEFT_TYPE = "LORA"
    adapter_kind = "lora"  # which adapter form the layers build (see lorakit.layers)

    def __post_init__(self):
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and the bad value."""
        _check_rank("r", self.r)
        for key, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", rank)
        _check_alpha("lora_alpha", self.lora_alpha)
        for key, alpha in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", alpha)
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        init = self.init_lora_weights
        if init not in INIT_CHOICES and not (isinstance(init, str) and init.startswith("pissa_niter_")):
            raise ValueError(
                f"init_lora_weights must be one of {INIT_CHOICES} or 'pissa_niter_K', got {init!r}"
            )
        if self.peft_type != self.PEFT_TYPE:
            raise ValueError(f"peft_type must be {self.PEFT_TYPE!r} for a {type(self).__name__}, got {self.peft_type!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is only used with layers_to_transform; set layers_to_transform too")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list)):
                raise ValueError(f"{name} must be a list of names or a regex string, got {value!r}")

    def layer_kwargs(self, module_name: str) -> dict[str, Any]:
        """Arguments for LoraLayer.add_adapter on the module `module_name`."""
        return dict(r=self.rank_for(module_name), lora_alpha=self.alpha_for(module_name),
                    lora_dropout=self.lora_dropout, init_lora_weights=self.init_lora_weights,
                    use_rslora=self.use_rslora, use_dora=self.use_dora)

    @property
    def svd_init(self) -> bool:
        """True for PiSSA / OLoRA initialisation (the base weight is changed at init)."""
        init = self.init_lora_weights
        return isinstance(init, str) and (init.startswith("pissa") or init == "olora")

    # --- serialisation -------------------------------------------------------------------
    def _saved_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.name != "extra_fields"]

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self._saved_fields()}
        out = {**self.extra_fields, **out}
        return json.loads(json.dumps(out))  # deep copy, JSON types only

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra_fields"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        ignored = sorted(k for k, v in extra.items()
                         if k not in PEFT_INERT_FIELDS and v not in (None, False, [], {}, "")
                         or k in PEFT_INERT_FIELDS and PEFT_INERT_FIELDS[k] is not None and v != PEFT_INERT_FIELDS[k])
        if ignored:
            warnings.warn(f"adapter_config.json fields not used by lorakit are kept and ignored: {ignored}")
        return cls(**kwargs, extra_fields=extra)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "LoraConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!s}: is this an adapter directory?")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        peft_type = data.get("peft_type", "LORA")
        if peft_type not in CONFIG_TYPES:
            raise ValueError(f"{path}: peft_type {peft_type!r} is not supported; lorakit reads {sorted(CONFIG_TYPES)}")
        return CONFIG_TYPES[peft_type].from_dict(data)

    def rank_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key else self.lora_alpha


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rule: a pattern key matches when it matches a dotted suffix of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


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
    adapter_kind = "vera"
    SAVED = ("r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
             "fan_in_fan_out", "bias", "modules_to_save", "init_weights", "layers_to_transform", "layers_pattern",
             "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_type")

    def __post_init__(self):
        self.lora_dropout = self.vera_dropout
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.use_dora or self.use_rslora or self.rank_pattern or self.alpha_pattern or self.svd_init:
            raise ValueError("VeRA has one shared rank and no alpha: use_dora, use_rslora, rank_pattern, "
                             "alpha_pattern and PiSSA/OLoRA init do not apply to a VeraConfig")
        if not isinstance(self.d_initial, (int, float)) or self.d_initial <= 0:
            raise ValueError(f"d_initial must be a number > 0, got {self.d_initial!r}")

    def layer_kwargs(self, module_name: str) -> dict[str, Any]:
        return dict(kind="vera", r=self.r, lora_alpha=1.0, lora_dropout=self.vera_dropout,
                    init_lora_weights=self.init_weights, d_initial=self.d_initial)

    def _saved_fields(self) -> list[str]:
        return list(self.SAVED)


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA (Zhang et al. 2023): ΔW = B diag(E) A in SVD form, ranks pruned from init_r to an average of
    target_r by importance while training. PEFT's AdaLoraConfig fields. Schedule: `tinit` warm-up steps at
    full rank, budget shrinks cubically until `total_step - tfinal`, then ranks are fixed. `rank_pattern`
    (written by training) maps '<module>.lora_E' to the kept singular values (list of bools).
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
    adapter_kind = "adalora"

    def validate(self) -> None:
        patterns, self.rank_pattern = self.rank_pattern, {}
        try:
            super().validate()
        finally:
            self.rank_pattern = patterns or None
        if self.use_dora or self.svd_init or self.alpha_pattern:
            raise ValueError("AdaLoRA has its own SVD form: use_dora, PiSSA/OLoRA init and alpha_pattern "
                             "do not apply to an AdaLoraConfig")
        _check_rank("init_r", self.init_r)
        _check_rank("target_r", self.target_r)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must be <= init_r ({self.init_r})")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None:
            if not isinstance(self.total_step, int) or self.total_step <= 0:
                raise ValueError(f"total_step must be an integer > 0, got {self.total_step!r}")
            if self.tinit >= self.total_step - self.tfinal:
                raise ValueError(f"tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase in "
                                 f"total_step={self.total_step}: need tinit < total_step - tfinal")
        if self.deltaT < 1:
            raise ValueError(f"deltaT must be >= 1, got {self.deltaT!r}")

    def __post_init__(self):
        rank_pattern = self.rank_pattern
        super().__post_init__()
        self.rank_pattern = {k: list(v) for k, v in rank_pattern.items()} if rank_pattern else None

    def rank_for(self, module_name: str) -> int:
        mask = (self.rank_pattern or {}).get(f"{module_name}.lora_E")
        return self.init_r if mask is None else int(sum(mask))

    def layer_kwargs(self, module_name: str) -> dict[str, Any]:
        return dict(kind="adalora", r=self.rank_for(module_name), lora_alpha=self.lora_alpha,
                    lora_dropout=self.lora_dropout, init_lora_weights=self.init_lora_weights, init_r=self.init_r)


CONFIG_TYPES: dict[str, type[LoraConfig]] = {c.PEFT_TYPE: c for c in (LoraConfig, VeraConfig, AdaLoraConfig)}


def config_from_dict(data: dict[str, Any]) -> LoraConfig:
    """A LoraConfig / VeraConfig / AdaLoraConfig from a dict, chosen by its `peft_type` (default LORA)."""
    peft_type = data.get("peft_type", "LORA")
    if peft_type not in CONFIG_TYPES:
        raise ValueError(f"peft_type must be one of {sorted(CONFIG_TYPES)}, got {peft_type!r}")
    return CONFIG_TYPES[peft_type](**data)
