"""LoraModel: a base model plus named adapters, with PEFT's API.

`PeftModel` is the same class. `model.base_model.model` is the wrapped transformers model,
as in PEFT, so code that reaches through those attributes keeps working.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from . import merging, peft_io
from .config import LoraConfig
from .inject import adapter_layers, inject_adapter, unwrap
from .layers import LoraLayer
from .multi import row_adapters
from .quant.nf4 import NF4Linear, requantize_linears

DEFAULT_ADAPTER = "default"


class LoraModel(nn.Module):
    """A model with LoRA adapters. Build it with `get_peft_model` or `LoraModel.from_pretrained`.

    >>> model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
    >>> model.print_trainable_parameters()                                                   # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str = adapter_name
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)
        self.train(model.training)

    # --- attribute access like the wrapped model -------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def base_model(self) -> "LoraModel":
        return self  # PEFT: PeftModel.base_model is the tuner, whose .model is the transformers model

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
        unknown = sorted({n for n in adapter_names if n is not None and n not in self.peft_config})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; loaded adapters: "
                             f"{sorted(self.peft_config)} (None means the base model)")
        return row_adapters(self._layers(), adapter_names)

    # --- adapters ----------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def _layers(self):
        return [m for _, m in adapter_layers(self.model)]

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Add a new adapter (not activated; call `set_adapter`). Parameters start frozen unless active."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; pick another name or delete_adapter() it")
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"expected a lorakit LoraConfig, got {type(peft_config).__name__}")
        inject_adapter(self.model, peft_config, adapter_name)
        self.peft_config[adapter_name] = peft_config
        for layer in self._layers():  # keep the current adapter active everywhere
            layer.set_active_adapters([self.active_adapter])
        self._set_trainable()

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; loaded adapters: {sorted(self.peft_config)}")

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter (its parameters trainable unless in inference mode)."""
        self._check_known(adapter_name)
        self.active_adapter = adapter_name
        for layer in self._layers():
            layer.set_active_adapters([adapter_name])
        self._set_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and free its parameters."""
        self._check_known(adapter_name)
        for layer in self._layers():
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            remaining = sorted(self.peft_config)
            self.active_adapter = remaining[0] if remaining else None
            if remaining:
                self.set_adapter(remaining[0])

    def _set_trainable(self) -> None:
        """Freeze everything, then unfreeze the active adapter (and biases as its config asks)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        config = self.peft_config.get(self.active_adapter)
        if config is None or config.inference_mode:
            return
        for layer in self._layers():
            for p in layer.adapter_parameters(self.active_adapter).values():
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
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """Merge the active adapter (or `adapter_names`) into the base weights, in place and reversibly."""
        for name in adapter_names or []:
            self._check_known(name)
        for layer in self._layers():
            if isinstance(layer, LoraLayer):
                layer.merge(adapter_names)

    def unmerge_adapter(self) -> None:
        for layer in self._layers():
            if isinstance(layer, LoraLayer):
                layer.unmerge()

    def merge_and_unload(self, adapter_names: list[str] | None = None, requantize: bool = False) -> nn.Module:
        """Merge the active adapter into the base weights and return the plain model (no lorakit modules).

        On a 4-bit (NF4) base the merged layers come back dequantized (float, compute dtype);
        `requantize=True` quantizes them to NF4 again and records the extra error in
        `model.requantization_error` (mean relative L2 error of the merged weights).
        """
        for name in adapter_names or []:
            self._check_known(name)
        quantized = [n for n, m in self.model.named_modules() if isinstance(m, LoraLayer)
                     and isinstance(m.base_layer, NF4Linear)]
        plain = unwrap(self.model, merge=True, adapter_names=adapter_names)
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

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # --- files ---------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, selected_adapters: list[str] | None = None,
                        path_initial_model_for_weight_conversion: str | None = None, **_) -> None:
        """Write each adapter in PEFT's format: 'default' in `save_directory`, others in a subfolder.

        `path_initial_model_for_weight_conversion`: the directory where a PiSSA/OLoRA adapter was saved
        right after initialisation. The adapter is then written as a plain LoRA of rank 2r relative to the
        original base weights (ΔW = s·(BA - B0A0)), portable to any copy of the original model (PEFT's option).
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory")
        for name in selected_adapters or list(self.peft_config):
            out_dir = save_directory if name == DEFAULT_ADAPTER else os.path.join(save_directory, name)
            self.save_adapter(name, out_dir, path_initial_model_for_weight_conversion)

    def save_adapter(self, adapter_name: str, directory: str, initial_adapter_dir: str | None = None) -> None:
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
        peft_io.write_adapter(directory, saved, state)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     allow_pickle: bool = False) -> None:
        """Load a PEFT-format adapter directory as a new adapter `adapter_name` (not activated)."""
        config, state = peft_io.read_adapter(str(model_id), allow_pickle=allow_pickle)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config)
        try:
            peft_io.load_adapter_weights(self.model, adapter_name, state, source=str(model_id))
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self._set_trainable()

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = DEFAULT_ADAPTER,
                        is_trainable: bool = False, allow_pickle: bool = False, **_) -> "LoraModel":
        """Wrap `model` with the adapter saved in `model_id` (ours or PEFT's)."""
        config, state = peft_io.read_adapter(str(model_id), allow_pickle=allow_pickle)
        config.inference_mode = not is_trainable
        peft_model = cls(model, config, adapter_name)
        try:
            peft_io.load_adapter_weights(peft_model.model, adapter_name, state, source=str(model_id))
        except Exception:
            peft_model.unload()
            raise
        return peft_model


def _saved_config(config: LoraConfig) -> LoraConfig:
    # A saved adapter is an inference artefact by default, as in PEFT.
    return dataclasses.replace(config, inference_mode=True)


PeftModel = LoraModel


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> LoraModel:
    """Inject LoRA adapters described by `peft_config` into `model`; only the adapters are trainable.

    >>> model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))  # doctest: +SKIP
    """
    if isinstance(model, LoraModel):
        raise ValueError("model already has LoRA adapters; use model.add_adapter(name, config) to add another")
    return LoraModel(model, peft_config, adapter_name)
