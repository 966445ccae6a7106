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
from typing import Any, Callable

import torch

from ..layers.form import AdapterForm
from ..utils import check_positive_int
from .default_targets import LORA_DEFAULTS
from .dora import DoraForm
from .lora import LoraForm
from .peft_types import PeftType, TaskType, as_enum

CONFIG_NAME = "adapter_config.json"
DEFAULT_ADAPTER = "default"  # the adapter name PEFT uses when none is given
INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")
BIAS_CHOICES = ("none", "all", "lora_only")
# PEFT fields we do not implement, with the value that means "feature off": such entries are silent.
PEFT_INERT_FIELDS = {"auto_mapping": None, "peft_version": None, "megatron_config": None,
                     "megatron_core": "megatron.core", "qalora_group_size": 16, "use_qalora": False,
                     "use_bdlora": None}
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
    target_parameters: list[str] | None = None  # bare nn.Parameters (MoE experts), PEFT's ParamWrapper
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
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    ensure_weight_tying: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_type: str = "LORA"
    # Fields we do not interpret, kept from a loaded file so saving preserves them.
    extra_fields: dict[str, Any] = field(default_factory=dict, repr=False)

    PEFT_TYPE = "LORA"
    PREFIX = "lora_"  # the start of its parameter names (PEFT's tuner.prefix)
    DEFAULT_TARGETS = LORA_DEFAULTS  # target_modules=None: PEFT's modules per model_type
    resumable = True  # a run with this adapter can continue from a checkpoint

    # Fields whose type is checked before anything else reads them: (accepted types, how errors say it).
    FIELD_TYPES = {
        "rank_pattern": ((dict, type(None)), "a mapping {module pattern: rank}"),
        "alpha_pattern": ((dict, type(None)), "a mapping {module pattern: alpha}"),
        "modules_to_save": ((list, tuple, set, type(None)), "a list of module names or null"),
        "layers_to_transform": ((int, list, type(None)), "a layer index, a list of them, or null"),
        "layers_pattern": ((str, list, type(None)), "a name, a list of names, or null"),
        "use_rslora": ((bool,), "true or false"), "use_dora": ((bool,), "true or false"),
        "fan_in_fan_out": ((bool,), "true or false"), "lora_bias": ((bool,), "true or false"),
        "inference_mode": ((bool,), "true or false"), "ensure_weight_tying": ((bool,), "true or false"),
        "base_model_name_or_path": ((str, type(None)), "a string or null"),
        "revision": ((str, type(None)), "a string or null"),
    }

    def check_field_types(self) -> None:
        """Raise ValueError naming a field whose value has the wrong type (checked before any model is touched)."""
        for name, (types, wanted) in self.FIELD_TYPES.items():
            value = getattr(self, name, None)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ValueError(f"{name} must be {wanted}, got {value!r}")
        for name in ("modules_to_save", "layers_pattern"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)) and not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must hold names (strings), got {value!r}")
        layers = self.layers_to_transform
        if isinstance(layers, list) and not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"layers_to_transform must be a layer index or a list of them, got {layers!r}")

    def __post_init__(self):
        self.check_field_types()
        self.task_type = as_enum(TaskType, self.task_type)  # PEFT's enums (strings equal to their names)
        self.peft_type = as_enum(PeftType, self.peft_type)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and the bad value."""
        check_positive_int("r", self.r)
        for key, rank in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{key!r}]", rank)
        check_alpha("lora_alpha", self.lora_alpha)
        for key, alpha in self.alpha_pattern.items():
            check_alpha(f"alpha_pattern[{key!r}]", alpha)
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        init = self.init_lora_weights
        named = init.lower() if isinstance(init, str) and init.lower() in ("gaussian", "olora") else init
        if named not in INIT_CHOICES and not (isinstance(init, str) and init.startswith("pissa_niter_")):
            raise ValueError(
                f"init_lora_weights must be one of {INIT_CHOICES} or 'pissa_niter_K', got {init!r}"
            )
        if self.svd_init and self.use_rslora and (self.rank_pattern or self.alpha_pattern):
            warnings.warn("Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of "
                          "modified base weights PiSSA/OLoRA means that you won't be able to pass "
                          "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial "
                          "values of the base weights; if you intend to do this, please ensure not to use rslora or "
                          "rank_pattern/alpha_pattern.")
        if self.lora_bias and (init not in (True, False) or self.use_dora):
            raise ValueError("lora_bias=True needs init_lora_weights=True or False and use_dora=False (as in PEFT), "
                             f"got init_lora_weights={init!r}, use_dora={self.use_dora!r}")
        tokens = self.trainable_token_indices
        token_lists = tokens.values() if isinstance(tokens, dict) else [tokens] if tokens is not None else []
        if not isinstance(tokens, (list, dict, type(None))) or any(
                not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
                for ids in token_lists):
            raise ValueError("trainable_token_indices must be a list of token ids or a dict {module name: [token "
                             f"ids]}}, got {tokens!r}")
        if self.peft_type != self.PEFT_TYPE:
            raise ValueError(f"peft_type must be {self.PEFT_TYPE!r} for a {type(self).__name__}, got {self.peft_type!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is only used with layers_to_transform; set layers_to_transform too")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string")
        params = self.target_parameters
        if params is not None and (not isinstance(params, list) or not all(isinstance(p, str) for p in params)):
            raise TypeError(f"`target_parameters` must be a list of strings or None: parameter names (e.g. "
                            f"['mlp.experts.gate_up_proj']), got {params!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list)):
                raise ValueError(f"{name} must be a list of names or a regex string, got {value!r}")

    def adapter_form(self, target_shapes: list[tuple[int, int]]) -> AdapterForm:
        """The form the layers build for this adapter; `target_shapes` are the targets' (d_in, d_out)."""
        form = LoraForm(self.init_lora_weights, self.use_rslora, self.lora_bias)
        return DoraForm(form) if self.use_dora else form

    def layer_kwargs(self, module_name: str) -> dict[str, Any]:
        """Arguments for LoraLayer.add_adapter on the module `module_name` (besides the form)."""
        return dict(r=self.rank_for(module_name), lora_alpha=self.alpha_for(module_name),
                    lora_dropout=self.lora_dropout)

    @classmethod
    def run_settings(cls, settings: dict[str, Any], total_steps: int | None) -> dict[str, Any]:
        """`settings` completed for a training run of `total_steps` optimizer steps (None: not known yet,
        while settings are checked before the model loads). Forms with a schedule fill it in here."""
        return settings

    single_trainable = False  # at most one adapter of this form may be trainable in a model (PEFT's AdaLoRA)

    def resize_by_rank_pattern(self, model, rank_pattern: dict, adapter_name: str) -> None:
        """Only AdaLoRA adapters resize by rank pattern: TypeError for other forms, as in PEFT."""
        raise TypeError(f"resize_modules_by_rank_pattern applies to AdaLoRA adapters, not {self.PEFT_TYPE}")

    regularization_weight = 0.0  # weight of `regularization` in the training loss

    def regularization(self, model, adapter_name: str) -> torch.Tensor | None:
        """A term the form adds to the training loss (before weighting), or None."""
        return None

    def step_callback(self, model, adapter_name: str) -> Callable[[Any, int], Any] | None:
        """`callback(model, step)` to run after each optimizer step, before gradients are cleared, or None."""
        return None

    @property
    def svd_init(self) -> bool:
        """True for PiSSA / OLoRA initialisation (the base weight is changed at init)."""
        init = self.init_lora_weights
        return isinstance(init, str) and (init.startswith("pissa") or init.lower() == "olora")

    # --- serialisation -------------------------------------------------------------------
    def _saved_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.name != "extra_fields"]

    def to_dict(self) -> dict[str, Any]:
        """The config as adapter_config.json holds it (JSON types only; unknown fields read from a file kept)."""
        out = {name: getattr(self, name) for name in self._saved_fields()}
        out = {**self.extra_fields, **out}
        return json.loads(json.dumps(out))  # deep copy, JSON types only

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """A config from adapter_config.json's contents; fields lorakit does not use are kept and warned about."""
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
        """The config saved in `directory` (any form: lorakit.variants.read_config picks the class)."""
        data = read_config_file(directory)
        if data.get("peft_type", "LORA") != cls.PEFT_TYPE:
            raise ValueError(f"{directory!s} holds a {data.get('peft_type')} adapter, not {cls.PEFT_TYPE}; "
                             "read it with lorakit.variants.read_config")
        return cls.from_dict(data)

    def rank_for(self, module_name: str) -> int:
        """The rank of module `module_name`: its rank_pattern entry, else r."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key else self.r

    def alpha_for(self, module_name: str) -> float:
        """The alpha of module `module_name`: its alpha_pattern entry, else lora_alpha."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key else self.lora_alpha


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rule: a pattern key matches when it matches a dotted suffix of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def read_config_file(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in `directory`/adapter_config.json; errors name the file."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!s}: is this an adapter directory?")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of settings, got {type(data).__name__}")
    return data
