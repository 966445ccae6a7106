"""PEFT's per-layer adapter switches (BaseTunerLayer.set_adapter / enable_adapters / _all_available_adapter_names),
as a mixin LoraLayer inherits: code written against PEFT's layers calls them directly."""

from __future__ import annotations

import warnings

from .form import AdapterFieldView, LiveMapping, live_mapping


def merge_candidates(merged: list[str], names: list[str]) -> list[str]:
    """The adapters of `names` not merged yet; warns, as PEFT does, when some or all already are."""
    todo = [n for n in names if n not in merged]
    if merged and todo:
        warnings.warn(f"Already following adapters were merged {','.join(merged)}. You are now additionally "
                      f"merging {','.join(todo)}.")
    elif merged and names:
        warnings.warn("All adapters are already merged, nothing to do.")
    return todo


class PeftLayerAPI:
    """PEFT's per-layer surface (r, lora_alpha, scaling as live dicts; VeRA projections; adapter switches). Needs the
    layer's `adapters`, `adapter_names`, `adapter_parameters(name)`, `set_active_adapters` and `disable_adapters`."""

    @property
    def r(self) -> AdapterFieldView:
        """{adapter: rank}, live (PEFT's dict)."""
        return AdapterFieldView(self.adapters, "r")

    @property
    def lora_alpha(self) -> AdapterFieldView:
        """{adapter: alpha}, live (PEFT's dict)."""
        return AdapterFieldView(self.adapters, "lora_alpha")

    @property
    def scaling(self) -> AdapterFieldView:
        """{adapter: s}, live (PEFT's dict): alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return AdapterFieldView(self.adapters, "scaling")

    @property
    def vera_A(self) -> LiveMapping:
        """VeRA adapters' shared projection A by adapter name (PEFT's layer attribute; only on VeRA layers)."""
        return live_mapping(lambda: self.vera_projections("A"), f"{type(self).__name__} holds no VeRA adapter")

    @property
    def vera_B(self) -> LiveMapping:
        """VeRA adapters' shared projection B by adapter name (PEFT's layer attribute; only on VeRA layers)."""
        return live_mapping(lambda: self.vera_projections("B"), f"{type(self).__name__} holds no VeRA adapter")

    def vera_projections(self, which: str) -> dict:
        """{VeRA adapter on this layer: its projection `which` ("A" or "B")}; empty without VeRA adapters."""
        return {n: getattr(a.form.projections, which) for n, a in self.adapters.items()
                if hasattr(a.form, "projections")}

    @property
    def active_adapter(self) -> list[str]:
        """The active adapters' names (PEFT's BaseTunerLayer.active_adapter, which transformers reads)."""
        return list(self.active_adapters)

    def _all_available_adapter_names(self) -> list[str]:
        """Every adapter this layer holds, sorted (PEFT's name)."""
        return sorted(self.adapter_names)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate these adapters on this layer: their parameters train (unless `inference_mode`), the others'
        are frozen, as PEFT's layer-level set_adapter does."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self._all_available_adapter_names():
            for p in self.adapter_parameters(name).values():
                p.requires_grad_(name in names and not inference_mode)
        self.set_active_adapters(names)

    def enable_adapters(self, enabled: bool) -> None:
        """Switch this layer's adapters on (the active ones train again) or off (all frozen, base output)."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self.disable_adapters = False
            return
        for name in self._all_available_adapter_names():
            for p in self.adapter_parameters(name).values():
                p.requires_grad_(False)
        self.disable_adapters = True
