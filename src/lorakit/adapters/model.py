"""LoraModel: a base model plus named adapters, with PEFT's API.

`PeftModel` is the same class. As in PEFT, `model.base_model` is the tuner (a `LoraTuner`, whose
methods are the LoraModel's) and `model.base_model.model` the wrapped transformers model, so parameter
names start with `base_model.model.` (what optimizer groups, wrap policies and name filters expect).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..layers import LoraLayer
from ..layers.form import LiveMapping, live_mapping
from ..layers.mixed_batch import row_adapters
from ..utils import forward_getattr
from ..variants.lora_config import DEFAULT_ADAPTER, LoraConfig
from .files import AdapterFiles, cast_to_base_dtype
from .inject import adapter_layers, inject_adapter
from .merge import AdapterMerging
from .status import AdapterReport
from .switches import AdapterSwitches
from .tuner import LoraTuner

BASE_ROW = "__base__"  # PEFT's name for a row of a mixed batch that uses no adapter


class LoraModel(AdapterFiles, AdapterMerging, AdapterReport, AdapterSwitches, nn.Module):
    """A model with LoRA adapters. Build it with `get_peft_model` or `LoraModel.from_pretrained`.

    >>> model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
    >>> model.print_trainable_parameters()                                                   # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER,
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, **_):
        super().__init__()
        self.base_model = LoraTuner(model, self)
        self.peft_config: dict[str, LoraConfig] = {}
        self._active: list[str] = [adapter_name]
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        self.set_adapter(adapter_name)
        # As in PEFT: the wrappers and the new adapter modules start in training mode (nn.Module's default,
        # so lora_dropout is live until model.eval()); the wrapped model's own modules keep their mode.

    # --- attribute access like the wrapped model -------------------------------------------
    def __getattr__(self, name: str):
        return forward_getattr(super().__getattr__, name,
                               lambda: None if name in ("model", "base_model") else self.model)

    @property
    def model(self) -> nn.Module:
        """The wrapped transformers model (= base_model.model)."""
        return self.base_model.model

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model, with the LoRA layers in it (PEFT's get_base_model)."""
        return self.model

    def forward(self, *args, adapter_names: list[str | None] | None = None, **kwargs):
        """The wrapped model's forward. `adapter_names` gives each batch row its own adapter (None = base).

        A returned `loss` includes the active adapter's weighted regulariser where its form has one
        (AdaLoRA's orthogonality term, as in PEFT, so transformers' Trainer trains AdaLoRA correctly)."""
        with self._rows(adapter_names):
            outputs = self.model(*args, **kwargs)
        if isinstance(getattr(outputs, "loss", None), torch.Tensor):  # only then: the regulariser costs time
            reg = self.weighted_regularization()
            outputs.loss = outputs.loss if reg is None else outputs.loss + reg
        return outputs

    def weighted_regularization(self) -> torch.Tensor | None:
        """The term the active adapter's form adds to the training loss (AdaLoRA: orth_reg_weight x
        orthogonality), or None. The training loop and forward both add exactly this."""
        config = self.peft_config.get(self._first_active)
        if config is None or not config.regularization_weight:
            return None
        return config.regularization_weight * config.regularization(self, self._first_active)

    def regularization_loss(self) -> torch.Tensor:
        """The active adapter's regulariser before weighting (AdaLoRA's orthogonality; 0 for other forms)."""
        config = self.peft_config.get(self._first_active)
        reg = config.regularization(self, self._first_active) if config is not None else None
        return torch.zeros(()) if reg is None else reg

    def generate(self, *args, adapter_names: list[str | None] | None = None, **kwargs):
        """The wrapped model's generate; `adapter_names` as in forward (one entry per prompt row)."""
        with self._rows(adapter_names):
            return self.model.generate(*args, **kwargs)

    def _rows(self, adapter_names):
        if adapter_names is None:
            return contextlib.nullcontext()
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode (as in PEFT); "
                             "call model.eval() first")
        adapter_names = [None if n == BASE_ROW else n for n in adapter_names]
        unknown = sorted({n for n in adapter_names if n is not None and n not in self.peft_config})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; loaded adapters: "
                             f"{sorted(self.peft_config)} (None or '{BASE_ROW}' means the base model)")
        return row_adapters(self._layers(), adapter_names)

    # --- adapters ----------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        """The start of the trained adapter parameters' names (PEFT's tuner attribute: "lora_", VeRA's
        "vera_lambda_"), by the active adapter's form; PEFT's helpers and TRL's weight sync read it."""
        config = self.active_peft_config
        return config.PREFIX if config is not None else LoraConfig.PREFIX

    @property
    def active_adapters(self) -> list[str]:
        """The adapters whose updates are applied (their deltas add), in order."""
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str] | None:
        """The active adapter's name; the list of names when several are active (as PEFT's tuner returns it)."""
        return self._active[0] if len(self._active) == 1 else (list(self._active) or None)

    @property
    def active_peft_config(self) -> LoraConfig | None:
        """The (first) active adapter's config, as PEFT's PeftModel names it."""
        return self.peft_config.get(self._first_active)

    @property
    def modules_to_save(self) -> set[str] | None:
        """The modules_to_save names of every loaded adapter's config (PEFT's attribute), None when there are none."""
        names = {n for c in self.peft_config.values() for n in (getattr(c, "modules_to_save", None) or [])}
        return names or None

    @property
    def vera_A(self) -> LiveMapping:
        """{VeRA adapter: its shared projection A} (PEFT's model attribute; the same tensors the layers use)."""
        return live_mapping(lambda: self._vera_projections("A"), "no VeRA adapter is loaded (vera_A)")

    @property
    def vera_B(self) -> LiveMapping:
        """The VeRA adapters' shared projection B by adapter name (PEFT's attribute)."""
        return live_mapping(lambda: self._vera_projections("B"), "no VeRA adapter is loaded (vera_B)")

    def _vera_projections(self, which: str) -> dict:
        return {n: t for layer in self._layers() if isinstance(layer, LoraLayer)
                for n, t in layer.vera_projections(which).items()}

    @property
    def _first_active(self) -> str | None:
        return self._active[0] if self._active else None

    def _layers(self):
        return [m for _, m in adapter_layers(self.model)]

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter (not activated; call `set_adapter`). Parameters start frozen unless active.
        Adapters are fp32 (PEFT's autocast_adapter_dtype=True); with False they take an fp16/bf16 base's dtype."""
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name!r} already exists; pick another name or "
                             "delete_adapter() it")
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"expected a lorakit LoraConfig, got {type(peft_config).__name__}")
        configs = (*self.peft_config.values(), peft_config)
        single = [c for c in configs if c.single_trainable and not c.inference_mode]
        if len({type(c) for c in single}) == 1 and len(single) > 1:
            raise ValueError(f"{type(peft_config).__name__.replace('Config', 'Model')} supports only 1 trainable "
                             "adapter. When using multiple "
                             "adapters, set inference_mode to True for all adapters except the one you want to "
                             "train.")
        with_bias = [c for c in configs if c.bias != "none"]
        if len(with_bias) > 1:  # base-layer biases are shared by all adapters (PEFT's rule)
            raise ValueError(f"{type(self).__name__} supports only 1 adapter with bias. When using multiple "
                             f"adapters, set bias to 'none' for all adapters (got bias={peft_config.bias!r})")
        targeted = {tuple(sorted(c.target_parameters)) for c in configs if getattr(c, "target_parameters", None)}
        if len(targeted) > 1:  # the file keys do not say which parameter a nested wrapper adapts (PEFT's rule)
            raise ValueError(f"all adapters must target the same set of parameters with target_parameters, got "
                             f"{sorted(targeted)}")
        inject_adapter(self.model, peft_config, adapter_name)
        if not autocast_adapter_dtype:
            cast_to_base_dtype(self._layers(), adapter_name)
        self.peft_config[adapter_name] = peft_config
        for layer in self._layers():  # keep the current adapters active everywhere
            layer.set_active_adapters(self._active)
        self._set_trainable()

    # --- per-step work of a form (PEFT's AdaLoRA surface) -------------------------------------------
    @property
    def trainable_adapter_name(self) -> str | None:
        """The adapter being trained: the first active one not in inference mode."""
        return next((n for n in self._active if not self.peft_config[n].inference_mode), None)

    def update_and_allocate(self, global_step: int) -> None:
        """Call after `optimizer.step()`, before `zero_grad()`, every step (PEFT's AdaLoRA call, on
        `model.base_model` or the model): the trained adapter's per-step work (AdaLoRA: importance scores and
        rank allocation). A no-op for forms without one."""
        if self.step_hook is not None:
            self.step_hook(self, global_step)

    @property
    def step_hook(self):
        """The trained adapter's per-step callable (made once and kept: it holds state across steps), or None."""
        name = self.trainable_adapter_name
        hooks = self.__dict__.setdefault("_step_hooks", {})
        if name is not None and name not in hooks:
            hooks[name] = self.peft_config[name].step_callback(self, name)
        return hooks.get(name)

    @property
    def rankallocator(self):
        """AdaLoRA's rank allocator of the trained adapter (PEFT's attribute), or None."""
        return getattr(self.step_hook, "__self__", None)

    def resize_modules_by_rank_pattern(self, rank_pattern: dict, adapter_name: str) -> None:
        """AdaLoRA: shrink adapter `adapter_name` to the singular triplets `rank_pattern` keeps (PEFT's method)."""
        self._check_known(adapter_name)
        self.peft_config[adapter_name].resize_by_rank_pattern(self, rank_pattern, adapter_name)

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist; loaded adapters: {sorted(self.peft_config)}")

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and free its parameters. A merged adapter is refused (unmerge it first)."""
        self._check_known(adapter_name)
        if any(adapter_name in getattr(layer, "merged_adapters", ()) for layer in self._layers()):
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge "
                             "them first.")
        for layer in self._layers():
            layer.delete_adapter(adapter_name)
        self.__dict__.get("_step_hooks", {}).pop(adapter_name, None)
        del self.peft_config[adapter_name]
        if adapter_name in self._active:
            still = [a for a in self._active if a != adapter_name]
            remaining = still or sorted(self.peft_config)[:1]
            self._active = remaining
            if remaining:
                self.set_adapter(remaining)

    task_classes: dict[str, type["LoraModel"]] = {}  # task_type -> PEFT's task class (task_models.py fills it)

    @classmethod
    def class_for(cls, config: LoraConfig) -> type["LoraModel"]:
        """The class PEFT would build: the task class for config.task_type when asked for the generic one."""
        return cls.task_classes.get(config.task_type, cls) if cls is LoraModel else cls


PeftModel = LoraModel
