"""The interface every adapter form implements, and the record a layer keeps per adapter.

A form answers three questions for one adapter on one layer: which parameters it has (under PEFT's
names), how they start, and which factors (A, B, s) with ΔW = s·B·A they stand for. The layer does the
geometry (linear, embedding, convolution: how A and B meet an input and a weight); every path
(forward, merge, mixed batch, export, adapter arithmetic) reads an adapter through `factors`, so the
delta math exists once. A form that is not a plain low-rank update (DoRA) overrides `update` and
`merged` / `unmerged` as well.

    plain LoRA  variants/lora.py      ΔW = s·B A                 s = alpha/r (alpha/sqrt(r) rsLoRA)
    DoRA        variants/dora.py      wraps another form: magnitude · (W + ΔW) / ||W + ΔW||
    AdaLoRA     variants/adalora.py   ΔW = s·B diag(E) A         s = alpha/init_r
    VeRA        variants/vera.py      ΔW = diag(λ_b) B_shared diag(λ_d) A_shared
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import functional as LF


@dataclass
class Adapter:
    """One adapter on one layer: its form and its numbers."""

    form: "AdapterForm"
    r: int
    lora_alpha: float
    scaling: float
    merge_state: Any = None  # what the form needs to undo its merge (DoRA: the weight norm at merge time)


class LiveMapping(Mapping):
    """A read-only mapping recomputed on every access (PEFT's per-adapter dicts that must follow deletions)."""

    def __init__(self, compute: Callable[[], dict]):
        self._compute = compute

    def __getitem__(self, key):
        return self._compute()[key]

    def __iter__(self):
        return iter(self._compute())

    def __len__(self) -> int:
        return len(self._compute())

    def __setitem__(self, key, value) -> None:
        """Only the write-back of an in-place update (`view[k] += 1` on a tensor) is allowed."""
        if self._compute().get(key) is not value:
            raise TypeError(f"{key!r}: this per-adapter mapping is read-only; update its tensor in place")

    def __repr__(self) -> str:
        return repr(self._compute())


def live_mapping(compute: Callable[[], dict], missing: str) -> LiveMapping:
    """A LiveMapping over `compute`, or AttributeError(`missing`) when it is empty now (an attribute PEFT has only
    where such adapters exist, so `hasattr` tells)."""
    if not compute():
        raise AttributeError(missing)
    return LiveMapping(compute)


class AdapterFieldView(MutableMapping):
    """A live {adapter name: value} view of one field of a layer's adapter records (PEFT's `layer.r`,
    `layer.lora_alpha`, `layer.scaling` dicts): it follows additions and deletions, and writing an entry sets
    the record's field (`layer.scaling[name] = 0.5`, as PEFT's set_scale does). Entries cannot be added or
    removed through it: adapters come and go with add_adapter / delete_adapter."""

    def __init__(self, adapters: dict[str, Adapter], field: str):
        self._adapters, self._field = adapters, field

    def __getitem__(self, name: str):
        return getattr(self._adapters[name], self._field)

    def __setitem__(self, name: str, value) -> None:
        if name not in self._adapters:
            raise KeyError(f"no adapter {name!r} on this layer (adapters: {sorted(self._adapters)})")
        setattr(self._adapters[name], self._field, value)

    def __delitem__(self, name: str) -> None:
        raise TypeError(f"remove adapters with delete_adapter, not by deleting from `{self._field}`")

    def __iter__(self):
        return iter(self._adapters)

    def __len__(self) -> int:
        return len(self._adapters)

    def __repr__(self) -> str:
        return repr(dict(self))


GEOMETRY_LAYERS = {"linear": "Linear / Conv1D", "embedding": "Embedding", "conv": "Conv1d/2d/3d",
                   "attention": "MultiheadAttention", "parameter": "nn.Parameter"}


class AdapterForm:
    """Base behaviour: a plain low-rank update s·B A x added to the base output."""

    label = "LoRA"                                 # how messages name the form
    geometries = ("linear", "embedding", "conv")   # the layer geometries it is defined on
    fusable = False    # the fused LoRA training kernel computes its forward exactly (plain LoRA only)
    mixable = True     # rows of one batch may use it beside other adapters (see layers/mixed_batch.py)

    def scaling(self, r: int, lora_alpha: float) -> float:
        return lora_alpha / r

    def check_target(self, target: str, base: torch.nn.Module, geometry: str) -> None:
        """Raise ValueError when the form is not defined on this target (before any module is touched)."""
        if geometry not in self.geometries:
            kinds = ", ".join(GEOMETRY_LAYERS[g] for g in self.geometries)
            raise ValueError(f"{self.label} adapters support {kinds} layers only; target {target!r} is "
                             f"{type(base).__name__}; narrow target_modules")

    def create(self, layer, name: str) -> None:
        """Create adapter `name`'s parameters on `layer` (layer.adapters[name] holds r) and initialise them."""
        raise NotImplementedError

    def factors(self, layer, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with ΔW = s · B @ A, oriented as the layer's pair (linear: (r, d_in), (d_out, r))."""
        raise NotImplementedError

    def output_bias(self, layer, name: str) -> torch.Tensor | None:
        """b with the adapter adding s·b to every output (PEFT's `lora_bias`: lora_B's bias), or None."""
        return None

    def tensors(self, layer, name: str) -> list[torch.Tensor]:
        """Every tensor the factors are computed from (a changed one means a changed update). Forms list them
        directly: mixed batches call this per layer and adapter on every forward."""
        return list(layer.adapter_parameters(name).values())

    def update(self, layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` = base(x) plus this adapter's contribution."""
        A, B, s = self.factors(layer, name)
        return layer.add_update(result, x, name, A, B, s)

    def merged(self, layer, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(the weight with the adapter folded in, state needed to undo it)."""
        return LF.merge(weight, layer.delta_weight(name)), None

    def unmerged(self, layer, name: str, weight: torch.Tensor, state: Any) -> torch.Tensor:
        return LF.unmerge(weight, layer.delta_weight(name))

    def file_key(self, key: str) -> str:
        """A parameter's name in PEFT's file, from its name on the layer ('lora_A.weight')."""
        return key

    def to_file(self, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors as its file lays them out (keys start with `prefix`)."""
        return state

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the adapter file holds besides the per-layer parameters (VeRA's shared projections)."""
        return {}

    def load_saved_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        if tensors:
            raise ValueError(f"{source}: tensors {sorted(tensors)} do not belong to a {self.label} adapter")

    def saved_keys(self) -> tuple[str, ...]:
        return ()
