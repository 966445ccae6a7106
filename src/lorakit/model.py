"""LoraModel: a base model plus named adapters, with PEFT's API.

`PeftModel` is the same class. As in PEFT, `model.base_model` is the tuner (a `LoraTuner`, whose
methods are the LoraModel's) and `model.base_model.model` the wrapped transformers model, so parameter
names start with `base_model.model.` (what optimizer groups, wrap policies and name filters expect).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from . import merging, peft_io, status
from .config import LoraConfig
from .inject import adapter_layers, inject_adapter, unwrap
from .layers import LoraLayer
from .multi import row_adapters
from .quant.nf4 import NF4Linear, requantize_linears

DEFAULT_ADAPTER = "default"
BASE_ROW = "__base__"  # PEFT's name for a row of a mixed batch that uses no adapter


class LoraTuner(nn.Module):
    """PEFT's `peft_model.base_model`: holds the transformers model as `.model`; every other attribute is the
    LoraModel's (so `model.base_model.set_adapter([...])`, `.merge_and_unload()`, ... work as in PEFT)."""

    def __init__(self, model: nn.Module, owner: "LoraModel"):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_owner", owner)  # not a submodule: no cycle in modules() / state_dict()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "_owner" not in self.__dict__:
                raise
            return getattr(self.__dict__["_owner"], name)

    def forward(self, *args, **kwargs):
        return self.__dict__["_owner"].forward(*args, **kwargs)


class LoraModel(nn.Module):
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
        self.train(model.training)

    # --- attribute access like the wrapped model -------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "base_model"):
                raise
            return getattr(self.model, name)

    @property
    def model(self) -> nn.Module:
        """The wrapped transformers model (= base_model.model)."""
        return self.base_model.model

    def get_base_model(self) -> nn.Module:
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
        config = self.peft_config.get(self.active_adapter)
        if config is None or not config.regularization_weight:
            return None
        return config.regularization_weight * config.regularization(self, self.active_adapter)

    def regularization_loss(self) -> torch.Tensor:
        """The active adapter's regulariser before weighting (AdaLoRA's orthogonality; 0 for other forms)."""
        config = self.peft_config.get(self.active_adapter)
        reg = config.regularization(self, self.active_adapter) if config is not None else None
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
    def active_adapters(self) -> list[str]:
        """The adapters whose updates are applied (their deltas add), in order."""
        return list(self._active)

    @property
    def active_adapter(self) -> str | None:
        """The active adapter's name (the first, when several are active)."""
        return self._active[0] if self._active else None

    def _layers(self):
        return [m for _, m in adapter_layers(self.model)]

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter (not activated; call `set_adapter`). Parameters start frozen unless active.
        Adapters are fp32 (PEFT's autocast_adapter_dtype=True); with False they take an fp16/bf16 base's dtype."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; pick another name or delete_adapter() it")
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"expected a lorakit LoraConfig, got {type(peft_config).__name__}")
        with_bias = [c for c in (*self.peft_config.values(), peft_config) if c.bias != "none"]
        if len(with_bias) > 1:  # base-layer biases are shared by all adapters (PEFT's rule)
            raise ValueError(f"{type(self).__name__} supports only 1 adapter with bias. When using multiple "
                             f"adapters, set bias to 'none' for all adapters (got bias={peft_config.bias!r})")
        inject_adapter(self.model, peft_config, adapter_name)
        if not autocast_adapter_dtype:
            _cast_to_base_dtype(self._layers(), adapter_name)
        self.peft_config[adapter_name] = peft_config
        for layer in self._layers():  # keep the current adapters active everywhere
            layer.set_active_adapters(self._active)
        self._set_trainable()

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; loaded adapters: {sorted(self.peft_config)}")

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter, or several (their deltas add, as in PEFT). Their parameters become trainable
        unless `inference_mode` or their config's inference_mode; all others are frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._check_known(name)
        self._active = names
        for layer in self._layers():
            layer.set_active_adapters(names)
        self._set_trainable(frozen=inference_mode)

    def disable_adapter_layers(self) -> None:
        """Turn every adapter off in place (the model computes the base model) until enable_adapter_layers()."""
        for name in self._active:
            if self.peft_config[name].bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be "
                              f"'{self.peft_config[name].bias}' does not produce the same output as the base model "
                              "would without adaption.")
        for layer in self._layers():
            layer.disable_adapters = True

    def enable_adapter_layers(self) -> None:
        for layer in self._layers():
            layer.disable_adapters = False

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and free its parameters."""
        self._check_known(adapter_name)
        for layer in self._layers():
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name in self._active:
            still = [a for a in self._active if a != adapter_name]
            remaining = still or sorted(self.peft_config)[:1]
            self._active = remaining
            if remaining:
                self.set_adapter(remaining)

    def _set_trainable(self, frozen: bool = False) -> None:
        """Freeze everything, then unfreeze the active adapters (and biases as their configs ask)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for name in [] if frozen else self._active:
            self._unfreeze(name)

    def _unfreeze(self, name: str) -> None:
        config = self.peft_config.get(name)
        if config is None or config.inference_mode:
            return
        for layer in self._layers():
            for p in layer.adapter_parameters(name).values():
                p.requires_grad_(True)
        if config.bias == "all":
            for name, p in self.model.named_parameters():
                if name.endswith(".bias"):
                    p.requires_grad_(True)
        elif config.bias == "lora_only":
            for layer in self._layers():
                if isinstance(layer, LoraLayer) and getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(True)

    @contextmanager
    def disable_adapter(self):
        """Run the base model: adapters off (merged ones are unmerged for the duration, then re-merged)."""
        layers = self._layers()
        merged = {id(l): list(l.merged_adapters) for l in layers if isinstance(l, LoraLayer)}
        for layer in layers:
            if isinstance(layer, LoraLayer):
                layer.unmerge()
            layer.disable_adapters = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disable_adapters = False
                if merged.get(id(layer)):
                    layer.merge(merged[id(layer)])

    # --- merging -------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge the active adapters (or `adapter_names`) into the base weights, in place and reversibly.
        `safe_merge` checks each merged weight for NaN/inf first (PEFT's option)."""
        for name in adapter_names or []:
            self._check_known(name)
        for layer in self._layers():
            if isinstance(layer, LoraLayer):
                layer.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for layer in self._layers():
            if isinstance(layer, LoraLayer):
                layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None, requantize: bool = False) -> nn.Module:
        """Merge the active adapter into the base weights and return the plain model (no lorakit modules).

        On a 4-bit (NF4) base the merged layers come back dequantized (float, compute dtype);
        `requantize=True` quantizes them to NF4 again and records the extra error in
        `model.requantization_error` (mean relative L2 error of the merged weights).
        """
        for name in adapter_names or []:
            self._check_known(name)
        quantized = [n for n, m in self.model.named_modules() if isinstance(m, LoraLayer)
                     and isinstance(m.base_layer, NF4Linear)]
        plain = unwrap(self.model, merge=True, adapter_names=adapter_names, safe_merge=safe_merge,
                       progressbar=progressbar)
        if requantize and quantized:
            plain.requantization_error = requantize_linears(plain, quantized)
        return plain

    def unload(self) -> nn.Module:
        """Remove all adapters without merging and return the plain base model (merged adapters are undone)."""
        return unwrap(self.model, merge=False)

    # --- adapter arithmetic ----------------------------------------------------------------------
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             density: float | None = None, majority_sign_method: str = "total",
                             svd_clamp: float | None = None) -> None:
        """A new adapter from a weighted combination of existing ones (PEFT's semantics; see lorakit.merging)."""
        merging.add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, density,
                                     majority_sign_method, svd_clamp)

    def resize_adapter(self, adapter_name: str, new_r: int) -> float:
        """Truncated-SVD re-factoring at rank new_r; returns the fraction of ΔW energy kept."""
        return merging.resize_adapter(self, adapter_name, new_r)

    # --- parameters ----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counted as PEFT counts them."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        # 4-bit weights live in buffers; count them as the parameters they stand for (PEFT does too).
        total += sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, NF4Linear))
        return trainable, total

    def get_layer_status(self) -> list:
        """PEFT's per-layer status (lorakit.status.TunerLayerStatus)."""
        return status.get_layer_status(self)

    def get_model_status(self):
        """PEFT's model status (lorakit.status.TunerModelStatus)."""
        return status.get_model_status(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # --- files ---------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: str | bool = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: str | None = None,
                        **_) -> None:
        """Write each adapter in PEFT's format: 'default' in `save_directory`, others in a subfolder.

        `safe_serialization=False` writes `adapter_model.bin` (pickle) as PEFT does; `is_main_process=False`
        writes nothing (distributed runs). `path_initial_model_for_weight_conversion`: where a PiSSA/OLoRA
        adapter was saved right after initialisation; the adapter is then written as a plain LoRA of rank 2r on
        the original base weights (ΔW = s·(BA - B0A0)), portable to any copy of the original model (PEFT's option).
        Embedding adapters are always saved (`save_embedding_layers` is accepted for PEFT's signature).
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory")
        for name in selected_adapters or []:
            self._check_known(name)
        if not is_main_process:
            return
        for name in selected_adapters or list(self.peft_config):
            out_dir = save_directory if name == DEFAULT_ADAPTER else os.path.join(save_directory, name)
            self.save_adapter(name, out_dir, path_initial_model_for_weight_conversion, safe_serialization)

    def save_adapter(self, adapter_name: str, directory: str, initial_adapter_dir: str | None = None,
                     safe_serialization: bool = True) -> None:
        """Write one adapter in PEFT's format into exactly `directory` (see save_pretrained for the conversion)."""
        self._check_known(adapter_name)
        config = self.peft_config[adapter_name]
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        if any(isinstance(l, LoraLayer) and adapter_name in l.merged_adapters for l in self._layers()):
            warnings.warn(f"adapter {adapter_name!r} is merged into the base weights; saving its (unchanged) factors")
        state = peft_io.adapter_state_dict(self.model, adapter_name, config)
        saved = _saved_config(config)
        if initial_adapter_dir is not None:
            saved, state = peft_io.converted_to_plain_lora(saved, state, initial_adapter_dir)
        peft_io.write_adapter(directory, saved, state, safe_serialization)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, torch_device=None,
                     autocast_adapter_dtype: bool = True, allow_pickle: bool = False, config: LoraConfig | None = None,
                     **_):
        """Load a PEFT-format adapter directory as a new adapter `adapter_name` (not activated). Returns PEFT's
        load result (missing / unexpected keys; both empty: lorakit refuses a file that does not fit). Without
        `is_trainable` the model is put in eval mode, as PEFT does (no dropout at inference)."""
        config, state = _read_adapter(model_id, is_trainable, allow_pickle, config)
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            peft_io.load_adapter_weights(self.model, adapter_name, state, source=str(model_id))
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self._set_trainable()
        if not is_trainable:
            self.eval()
        return _IncompatibleKeys([], [])

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = DEFAULT_ADAPTER,
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        autocast_adapter_dtype: bool = True, allow_pickle: bool = False, **_) -> "LoraModel":
        """Wrap `model` with the adapter saved in `model_id` (ours or PEFT's); eval mode unless `is_trainable`.
        `config` replaces the file's adapter_config.json, as in PEFT."""
        config, state = _read_adapter(model_id, is_trainable, allow_pickle, config)
        peft_model = model_class(cls, config)(model, config, adapter_name,
                                              autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            peft_io.load_adapter_weights(peft_model.model, adapter_name, state, source=str(model_id))
        except Exception:
            peft_model.unload()
            raise
        return peft_model if is_trainable else peft_model.eval()


def _read_adapter(model_id, is_trainable: bool, allow_pickle: bool, config: LoraConfig | None):
    file_config, state = peft_io.read_adapter(str(model_id), allow_pickle=allow_pickle)
    config = file_config if config is None else dataclasses.replace(config)
    config.inference_mode = not is_trainable
    return config, state


def _saved_config(config: LoraConfig) -> LoraConfig:
    # A saved adapter is an inference artefact by default, as in PEFT.
    return dataclasses.replace(config, inference_mode=True)


def _cast_to_base_dtype(layers, adapter_name: str) -> None:
    for layer in layers:
        dtype = getattr(getattr(layer, "base_layer", None), "weight", None)
        dtype = getattr(dtype, "dtype", None)
        if isinstance(layer, LoraLayer) and dtype in (torch.float16, torch.bfloat16):
            with torch.no_grad():
                for p in layer.adapter_parameters(adapter_name).values():
                    p.data = p.data.to(dtype)


PeftModel = LoraModel


class PeftModelForCausalLM(LoraModel):
    """PEFT's task class for task_type="CAUSAL_LM" (same behaviour as LoraModel)."""


class PeftModelForSeq2SeqLM(LoraModel):
    """task_type="SEQ_2_SEQ_LM"."""


class PeftModelForFeatureExtraction(LoraModel):
    """task_type="FEATURE_EXTRACTION"."""


class _WithTaskHead(LoraModel):
    """A task class whose head is trained in full: its names join `modules_to_save` (PEFT's behaviour)."""

    HEAD_NAMES: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER, **kwargs):
        config.modules_to_save = [*(config.modules_to_save or []), *self.HEAD_NAMES]
        super().__init__(model, config, adapter_name, **kwargs)

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, **kwargs) -> None:
        if self.peft_config:  # the first adapter's config was extended in __init__
            peft_config.modules_to_save = [*(peft_config.modules_to_save or []), *self.HEAD_NAMES]
        super().add_adapter(adapter_name, peft_config, **kwargs)


class PeftModelForSequenceClassification(_WithTaskHead):
    """task_type="SEQ_CLS": the `classifier` / `score` head is trained and saved in full."""

    HEAD_NAMES = ("classifier", "score")


class PeftModelForTokenClassification(_WithTaskHead):
    """task_type="TOKEN_CLS": the `classifier` / `score` head is trained and saved in full."""

    HEAD_NAMES = ("classifier", "score")


class PeftModelForQuestionAnswering(_WithTaskHead):
    """task_type="QUESTION_ANS": the `qa_outputs` head is trained and saved in full."""

    HEAD_NAMES = ("qa_outputs",)


TASK_MODEL_CLASSES: dict[str, type[LoraModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM, "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM, "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification, "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction}


def model_class(cls: type[LoraModel], config: LoraConfig) -> type[LoraModel]:
    """The class PEFT would build: the task class for config.task_type when asked for the generic one."""
    return TASK_MODEL_CLASSES.get(config.task_type, cls) if cls is LoraModel else cls


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER, mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> LoraModel:
    """Inject LoRA adapters described by `peft_config` into `model`; only the adapters are trainable. Returns
    PEFT's task class for `task_type` (PeftModelForCausalLM, ...). `mixed` is accepted: every lorakit model
    can hold adapters of different forms.

    >>> model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))  # doctest: +SKIP
    """
    if isinstance(model, LoraModel):
        raise ValueError("model already has LoRA adapters; use model.add_adapter(name, config) to add another")
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(f"peft config has already set base model revision to {peft_config.revision}, "
                          f"overwriting with revision {revision}")
        peft_config.revision = revision
    return model_class(LoraModel, peft_config)(model, peft_config, adapter_name,
                                               autocast_adapter_dtype=autocast_adapter_dtype)
