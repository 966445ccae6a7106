"""LoraLayer: what every wrapped layer shares — the adapter records, their PEFT-named containers,
activation, deletion, the forward that asks each adapter's form, and merging."""

from __future__ import annotations

import math

import torch
from torch import nn

from .form import Adapter, AdapterForm
from .mixed_batch import mixed_rows_output
from .peft_layer_api import PeftLayerAPI, merge_candidates


class Matrix(nn.Module):
    """One bare adapter matrix kept in a ModuleDict (when another form on the layer stores modules there)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)


class LoraLayer(PeftLayerAPI, nn.Module):
    """Adapter bookkeeping shared by every wrapped layer type."""

    geometry = ""
    fan_in_fan_out = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.adapters: dict[str, Adapter] = {}
        self.adapter_layer_names: list[str] = []  # PEFT-named containers holding adapter parameters
        self.other_param_names: list[str] = []    # containers of per-adapter state that is not trained or saved
        self.merged_adapters: list[str] = []
        self.tied_adapters: set[str] = set()  # adapters whose ΔW another layer merges into this (shared) weight
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.row_adapters: list[str | None] | None = None  # set by LoraModel for mixed-adapter batches

    # --- geometry each layer type implements --------------------------------------------------
    @staticmethod
    def check_rank(target: str, base: nn.Module, r: int) -> None:
        """Raise ValueError when rank `r` cannot be built on `base` (checked before any module is touched)."""

    def make_pair(self, name: str, r: int, bias: bool = False) -> None:
        """Create the (A, B) pair of adapter `name` in the layer's PEFT-named containers (`bias`: B gets one,
        PEFT's lora_bias; not defined for embeddings)."""
        raise NotImplementedError

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A, B) tensors of adapter `name` (the parameters the optimizer updates)."""
        raise NotImplementedError

    def reset_pair(self, name: str, gaussian: bool = False) -> None:
        """PEFT's default: A Kaiming-uniform (or N(0, 1/r) for 'gaussian'), B zero, so ΔW starts at 0."""
        A, B = self.pair(name)
        if gaussian:
            nn.init.normal_(A, std=1 / self.adapters[name].r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)

    def lowrank(self, h: torch.Tensor, name: str, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """B A h for an input already dropped out and cast."""
        raise NotImplementedError

    def lowrank_update(self, x: torch.Tensor, name: str, A, B, s: float) -> torch.Tensor:
        """s · B A dropout(x): what the adapter adds to base(x)."""
        return self.lowrank(self.lora_dropout[name](x.to(A.dtype)), name, A, B) * s

    def add_update(self, result: torch.Tensor, x: torch.Tensor, name: str, A, B, s: float) -> torch.Tensor:
        """`result` (the base output) plus adapter `name`'s update s · B A dropout(x)."""
        return result + self.lowrank_update(x, name, A, B, s)

    def delta(self, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
        """ΔW shaped like the stored base weight."""
        raise NotImplementedError

    # --- adapter lifecycle ------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """The names of the adapters this layer holds, in the order they were added."""
        return list(self.adapters)

    peft_class = ""  # the class PEFT names this layer (repr: "lora.Linear(...)"); default: the base's class name
    TUNER_PREFIX = {"VERA": "vera", "ADALORA": "adalora"}  # by form label; LoRA and DoRA layers are "lora."

    def __repr__(self) -> str:
        """PEFT's repr: "<tuner>.<class>(" then the module tree, e.g. "lora.Linear((base_layer): Linear(...) ..."."""
        first = next(iter(self.adapters.values()), None)
        tuner = self.TUNER_PREFIX.get(getattr(first.form, "label", ""), "lora") if first else "lora"
        tree = super().__repr__()[len(type(self).__name__):]
        return f"{tuner}.{self.peft_class or type(self.base_layer).__name__}{tree}"

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (what code that reads `module.weight` expects)."""
        # Code that reads `module.weight` (dtype/device probes, tied-weight checks) sees the base weight.
        return self.base_weight()

    def base_weight(self) -> torch.Tensor:
        """The base weight the adapters' ΔW applies to."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias, or None."""
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        """True while any adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    def add_adapter(self, name: str, form: AdapterForm, r: int, lora_alpha: float, lora_dropout: float = 0.0) -> None:
        """Create adapter `name` of the given form (its parameters in fp32 on the base layer's device)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        form.check_target(name, self.base_layer, self.geometry)
        self.adapters[name] = Adapter(form, r, lora_alpha, form.scaling(r, lora_alpha))
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        form.create(self, name)
        self._to_base_device(name)
        if not self.active_adapters:
            self.active_adapters = [name]

    def container(self, attr: str, kind: type = nn.ParameterDict, names: list[str] | None = None) -> nn.Module:
        """The PEFT-named container `attr` (created on first use, listed in `names`: adapter_layer_names
        by default). Forms store matrices bare (AdaLoRA's `lora_A.<name>`, as PEFT) or in modules (LoRA's
        `lora_A.<name>.weight`); when both meet on one layer the container holds modules, bare ones wrapped."""
        names = self.adapter_layer_names if names is None else names
        if attr not in names:
            setattr(self, attr, kind())
            names.append(attr)
        found = getattr(self, attr)
        if kind is nn.ModuleDict and isinstance(found, nn.ParameterDict):
            found = nn.ModuleDict({n: Matrix(p) for n, p in found.items()})  # same Parameter objects
            setattr(self, attr, found)
        return found

    def add_param(self, attr: str, name: str, value: torch.Tensor) -> None:
        """A bare matrix for adapter `name` (wrapped in a Matrix module where `attr` holds modules)."""
        container = self.container(attr)
        container[name] = Matrix(value) if isinstance(container, nn.ModuleDict) else nn.Parameter(value)

    def add_other(self, attr: str, name: str, value: torch.Tensor) -> None:
        """Per-adapter state that is neither trained nor saved (AdaLoRA's `ranknum`), in PEFT's place."""
        self.container(attr, names=self.other_param_names)[name] = nn.Parameter(value, requires_grad=False)

    def matrix(self, attr: str, name: str) -> torch.Tensor:
        """Adapter `name`'s matrix in container `attr`: a module's weight or a bare parameter."""
        item = getattr(self, attr)[name]
        return item if isinstance(item, nn.Parameter) else item.weight

    def _to_base_device(self, name: str) -> None:
        # Adapters live on the base layer's device, in fp32 (stable optimisation for bf16/fp16 bases).
        device = next(iter([*self.base_layer.parameters(), *self.base_layer.buffers()])).device
        for _, container, item in self._adapter_items(name, extra=tuple(self.other_param_names)):
            if isinstance(item, nn.Parameter):
                container[name] = nn.Parameter(item.detach().to(device=device, dtype=torch.float32),
                                               requires_grad=item.requires_grad)
            else:
                item.to(device=device, dtype=torch.float32)

    def _adapter_items(self, name: str, extra: tuple[str, ...] = ()):
        """(container name, container, entry) for every container holding adapter `name`."""
        for layer_name in (*self.adapter_layer_names, *extra):
            container = getattr(self, layer_name)
            if name in container:
                yield layer_name, container, container[name]

    def oriented_weight(self) -> torch.Tensor:
        """The base weight as (d_out, d_in, *kernel), whatever the layer's storage convention."""
        return self.stored_orientation(self.base_weight())

    def stored_orientation(self, oriented: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor in the base's storage layout (transposed for fan_in_fan_out layers)."""
        return oriented.T if self.fan_in_fan_out else oriented

    def oriented_delta(self, name: str) -> torch.Tensor:
        """Adapter `name`'s ΔW in fp32, in the base weight's storage layout."""
        return self.stored_orientation(self.delta_weight(name, dtype=torch.float32))

    def norm_delta(self, name: str) -> torch.Tensor:
        """The ΔW DoRA's weight norm ||W + ΔW|| uses: ΔW itself (oriented, fp32) except where a layer says
        otherwise (grouped convolutions)."""
        return self.oriented_delta(name)

    def effective_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A', B', s) with ΔW = s · B' A', whatever the adapter's form."""
        return self.adapters[name].form.factors(self, name)

    def delta_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW of adapter `name`, shaped like the base weight, in `dtype` (default: the base weight's)."""
        return self.delta(*self.effective_factors(name)).to(dtype or self.base_weight().dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """PEFT's name for `delta_weight`."""
        return self.delta_weight(adapter)

    def factor_versions(self, name: str) -> tuple[int, ...]:
        """Identity and in-place write counter of each tensor adapter `name` computes with (a changed
        tuple means changed weights). Kept cheap: it runs per layer on every mixed-batch forward."""
        return tuple(v for t in self.adapters[name].form.tensors(self, name) for v in (id(t), t._version))

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` and free its parameters (ValueError while it is merged)."""
        if name in self.merged_adapters:
            raise ValueError(f"Cannot delete adapter(s) {[name]} while they are merged. Please unmerge them first.")
        for _, container, _ in self._adapter_items(name, extra=("lora_dropout", *self.other_param_names)):
            del container[name]
        self.adapters.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active_adapters(self, names: list[str]) -> None:
        """PEFT keeps every requested name (a layer without one of them simply skips it)."""
        self.active_adapters = list(names)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """{'lora_A.weight': p, ...}: the adapter's parameters under their file-format names ({} if absent)."""
        if name not in self.adapters:
            return {}
        out = {}
        for layer_name, _, item in self._adapter_items(name):
            if isinstance(item, nn.Parameter):
                out[layer_name] = item
            else:
                out.update({f"{layer_name}.{k}": p for k, p in item.named_parameters()})
        form = self.adapters[name].form
        return {form.file_key(k): p for k, p in out.items()}

    def _unmerged_active(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [n for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters]

    def _mixed_forward(self, x, update_fn, *args, **kwargs):
        if self.merged_adapters:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` "
                             "first.")
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        return mixed_rows_output(self, x, self.row_adapters, result, update_fn(self, x, self.row_adapters))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output plus the active adapters' updates (per row in a mixed-adapter batch)."""
        if self.row_adapters is not None:
            return self._mixed_forward(x, self.mixed_update, *args, **kwargs)
        names = self._unmerged_active()
        fused = self.fused_forward(x, names) if names else None
        if fused is not None:
            return fused
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in names:
            result = self.adapters[name].form.update(self, name, x, result)
        return result.to(out_dtype)

    def fused_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor | None:
        """The whole output from one fused kernel where the layer has one for these adapters, else None."""
        return None

    # --- merging ------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters' ΔW into the base weight. Merging an adapter twice warns and does nothing.
        `safe_merge`: check the merged weight for NaN/inf before writing it (PEFT's option; raises ValueError)."""
        names = self.active_adapters if adapter_names is None else adapter_names
        if not isinstance(self.base_weight(), nn.Parameter):
            raise ValueError(f"cannot merge in place into a {type(self.base_layer).__name__} (quantized) weight; "
                             "use merge_and_unload(), which dequantizes first")
        weight = self.base_weight()
        names = merge_candidates(self.merged_adapters, [n for n in names if n in self.adapters])
        for name in names:
            adapter = self.adapters[name]
            if name in self.tied_adapters:  # the tied embedding writes this ΔW into the shared weight
                self.merged_adapters.append(name)
                continue
            with torch.no_grad():
                merged, adapter.merge_state = adapter.form.merged(self, name, weight)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                weight.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ΔW (last merged first). A no-op when nothing is merged."""
        weight = self.base_weight()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            adapter = self.adapters[name]
            if name in self.tied_adapters:
                continue
            with torch.no_grad():
                weight.copy_(adapter.form.unmerged(self, name, weight, adapter.merge_state))
            adapter.merge_state = None
