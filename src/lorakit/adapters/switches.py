"""Which adapters are on and which parameters train: `AdapterSwitches`, a mixin LoraModel inherits (PEFT's
set_adapter, enable/disable_adapter_layers and the disable_adapter context). It uses the model's `peft_config`,
`_active`, `_check_known`, `_layers` and `model`."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from ..layers import LoraLayer


class AdapterSwitches:
    """Activating adapters, switching them off and on, and the trainable flags that follow."""

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter, or several (their deltas add, as in PEFT). Their parameters become trainable
        unless `inference_mode` or their config's inference_mode; all others are frozen."""
        names = self._known_names(adapter_name)
        for layer in self._layers():  # refuse before any layer changes (trainable tokens: one active adapter)
            if hasattr(layer, "check_active"):
                layer.check_active(names)
        self._active = names
        for layer in self._layers():
            layer.set_active_adapters(names)
        self._set_trainable(frozen=inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Make these adapters' parameters (LoRA factors, module copies, token rows) trainable or frozen,
        whatever is active (PEFT's method)."""
        names = self._known_names(adapter_names)
        for layer in self._layers():
            for name in names:
                for p in layer.adapter_parameters(name).values():
                    p.requires_grad_(requires_grad)

    def _known_names(self, names: str | list[str]) -> list[str]:
        """One adapter name or several, as a list; an unknown one is refused."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            self._check_known(name)
        return names

    def disable_adapter_layers(self) -> None:
        """Turn every adapter off in place (the model computes the base model; adapter parameters frozen, as in
        PEFT) until enable_adapter_layers()."""
        for name in self._active:
            if self.peft_config[name].bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be "
                              f"'{self.peft_config[name].bias}' does not produce the same output as the base model "
                              "would without adaption.")
        for layer in self._layers():
            layer.disable_adapters = True
        self._set_trainable(frozen=True)

    def enable_adapter_layers(self) -> None:
        """Turn the adapters back on; the active ones train again (unless their config is inference-only)."""
        for layer in self._layers():
            layer.disable_adapters = False
        self._set_trainable()

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
        """Run the base model: adapters off (merged ones are unmerged for the duration, then re-merged). On exit the
        layers are as before: all on, or all off; a mix (some layers switched off by hand) warns and ends all on,
        as in PEFT."""
        layers = self._layers()
        was_disabled = {bool(layer.disable_adapters) for layer in layers}
        if len(was_disabled) > 1:
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                          "This is most likely unintentional. After exiting the disable_adapter context, all "
                          "adapters will be enabled")
        merged = {id(l): list(l.merged_adapters) for l in layers if hasattr(l, "unmerge")}
        for layer in layers:
            if hasattr(layer, "unmerge"):
                layer.unmerge()
        self.disable_adapter_layers()
        try:
            yield
        finally:
            if was_disabled != {True}:
                self.enable_adapter_layers()
            for layer in layers:
                if merged.get(id(layer)):
                    layer.merge(merged[id(layer)])
