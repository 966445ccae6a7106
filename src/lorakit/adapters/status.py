"""PEFT's `get_layer_status` / `get_model_status`: what each adapter layer holds, is doing and where it lives."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..quant.nf4 import NF4Linear
from .inject import adapter_layers

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _uniform(values) -> bool | Irregular:
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _one_or_irregular(values: set):
    return values.pop() if len(values) == 1 else "irregular"


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One status per adapter layer (LoRA layers and modules_to_save wrappers), as PEFT reports them."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = "model." if hasattr(model, "get_base_model") else ""  # PEFT names layers from the tuner
    out = []
    for name, layer in adapter_layers(root):
        names = list(getattr(layer, "adapters", None) or layer.modules_to_save)
        params = {n: (list(layer.adapter_parameters(n).values()) if hasattr(layer, "adapters")
                      else list(layer.modules_to_save[n].parameters())) for n in names}
        base = getattr(layer, "base_layer", None)
        out.append(TunerLayerStatus(
            name=prefix + name, module_type=type(layer).__name__, enabled=not layer.disable_adapters,
            active_adapters=list(layer.active_adapters), merged_adapters=list(getattr(layer, "merged_adapters", [])),
            requires_grad={n: _uniform(p.requires_grad for p in ps) for n, ps in params.items()},
            available_adapters=sorted(names),
            devices={n: sorted({p.device.type for p in ps}) for n, ps in params.items()},
            quantization_backend="nf4" if isinstance(base, NF4Linear) else None))
    if not out:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you have "
                         "PEFT adapters injected in the model.")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The layer statuses summed up for the model ('irregular' where layers disagree), as PEFT reports it."""
    layers = get_layer_status(model)
    peft_model = hasattr(model, "get_base_model")
    if peft_model:
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    merged_all = set().union(*(s.merged_adapters for s in layers))
    partly_merged = any((set(s.available_adapters) - set(s.merged_adapters)) & merged_all for s in layers)
    actives = {tuple(s.active_adapters) for s in layers}
    requires_grad, devices = defaultdict(list), defaultdict(set)
    for status in layers:
        for key, value in status.requires_grad.items():
            requires_grad[key].append(value)
        for key, value in status.devices.items():
            devices[key].update(value)
    return TunerModelStatus(
        base_model_type=type(model.get_base_model() if peft_model else model).__name__,
        adapter_model_type="LoraModel" if peft_model else "None",
        peft_types={k: c.peft_type for k, c in model.peft_config.items()} if peft_model else {},
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=_one_or_irregular({s.enabled for s in layers}),
        active_adapters=list(_one_or_irregular(actives)) if len(actives) == 1 else ("irregular" if actives else []),
        merged_adapters="irregular" if partly_merged else sorted(merged_all),
        requires_grad={k: _uniform(v) for k, v in requires_grad.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={k: sorted(v) for k, v in devices.items()},
        quantization_backend=_one_or_irregular({s.quantization_backend for s in layers}))


class AdapterReport:
    """PEFT's parameter counts and status reports, as LoraModel methods (a mixin LoraModel inherits)."""

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
        """PEFT's per-layer status (lorakit.adapters.status.TunerLayerStatus)."""
        return get_layer_status(self)

    def get_model_status(self):
        """PEFT's model status (lorakit.adapters.status.TunerModelStatus)."""
        return get_model_status(self)

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: trainable params, all params and the trainable percentage."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")
