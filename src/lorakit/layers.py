"""LoRA layers: each wraps (never subclasses) a base layer and adds named adapters.

A layer does the geometry — how an adapter's pair (A, B) meets an input and the base weight:
  Linear     A: (r, d_in)            B: (d_out, r)          out = B A x
  Embedding  A: (r, num_embeddings)  B: (embedding_dim, r)  out = B A[:, ids]
  ConvNd     A: conv, base kernel    B: 1x1 conv            out = B * (A * x)
The adapter's form (variants/) decides which parameters it has, how they start and which factors
they stand for; the layer keeps one `Adapter` record per name and asks the form. Parameter names
are PEFT's (`base_layer`, `lora_A`, `lora_B`, `lora_embedding_A`, ...) so a state dict maps one to
one onto PEFT's adapter files. Merging is an explicit, idempotent call.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import functional as LF
from .kernels import fused_lora_linear
from .multi import mixed_embedding_update, mixed_linear_update
from .quant.nf4 import NF4Linear
from .variants.form import Adapter, AdapterForm


class LoraLayer(nn.Module):
    """Adapter bookkeeping shared by every wrapped layer type."""

    geometry = ""
    fan_in_fan_out = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.adapters: dict[str, Adapter] = {}
        self.adapter_layer_names: list[str] = []  # PEFT-named containers holding adapter parameters
        self.merged_adapters: list[str] = []
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.row_adapters: list[str | None] | None = None  # set by LoraModel for mixed-adapter batches

    # --- geometry each layer type implements --------------------------------------------------
    def make_pair(self, name: str, r: int) -> None:
        """Create the (A, B) pair of adapter `name` in the layer's PEFT-named containers."""
        raise NotImplementedError

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
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
        return result + self.lowrank_update(x, name, A, B, s)

    def delta(self, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
        """ΔW shaped like the stored base weight."""
        raise NotImplementedError

    # --- adapter lifecycle ------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    @property
    def r(self) -> dict[str, int]:
        return {n: a.r for n, a in self.adapters.items()}

    @property
    def lora_alpha(self) -> dict[str, float]:
        return {n: a.lora_alpha for n, a in self.adapters.items()}

    @property
    def scaling(self) -> dict[str, float]:
        return {n: a.scaling for n, a in self.adapters.items()}

    @property
    def weight(self) -> torch.Tensor:
        # Code that reads `module.weight` (dtype/device probes, tied-weight checks) sees the base weight.
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
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
        self.train(self.base_layer.training)  # new dropout modules follow the model's train/eval mode

    def container(self, attr: str, kind: type = nn.ParameterDict) -> nn.Module:
        """The PEFT-named container `attr` (created on first use)."""
        if attr not in self.adapter_layer_names:
            setattr(self, attr, kind())
            self.adapter_layer_names.append(attr)
        return getattr(self, attr)

    def add_param(self, attr: str, name: str, value: torch.Tensor) -> None:
        self.container(attr)[name] = nn.Parameter(value)

    def _to_base_device(self, name: str) -> None:
        # Adapters live on the base layer's device, in fp32 (stable optimisation for bf16/fp16 bases).
        device = next(iter([*self.base_layer.parameters(), *self.base_layer.buffers()])).device
        for _, container, item in self._adapter_items(name):
            if isinstance(item, nn.Parameter):
                container[name] = nn.Parameter(item.detach().to(device=device, dtype=torch.float32))
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
        return self.stored_orientation(self.base_layer.weight)

    def stored_orientation(self, oriented: torch.Tensor) -> torch.Tensor:
        return oriented.T if self.fan_in_fan_out else oriented

    def oriented_delta(self, name: str) -> torch.Tensor:
        return self.stored_orientation(self.delta_weight(name, dtype=torch.float32))

    def effective_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A', B', s) with ΔW = s · B' A', whatever the adapter's form."""
        return self.adapters[name].form.factors(self, name)

    def delta_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW of adapter `name`, shaped like the base weight, in `dtype` (default: the base weight's)."""
        return self.delta(*self.effective_factors(name)).to(dtype or self.base_layer.weight.dtype)

    def factor_versions(self, name: str) -> tuple[int, ...]:
        """Identity and in-place write counter of each tensor adapter `name` computes with (a changed
        tuple means changed weights). Kept cheap: it runs per layer on every mixed-batch forward."""
        return tuple(v for t in self.adapters[name].form.tensors(self, name) for v in (id(t), t._version))

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting")
        for _, container, _ in self._adapter_items(name, extra=("lora_dropout",)):
            del container[name]
        self.adapters.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active_adapters(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]

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
            raise ValueError("mixed-adapter batches need unmerged adapters; call unmerge_adapter() first")
        result = self.base_layer(x, *args, **kwargs)
        update = None if self.disable_adapters else update_fn(self, x, self.row_adapters)
        return result if update is None else (result + update).to(result.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._mixed_forward(x, self.mixed_update, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self._unmerged_active():
            result = self.adapters[name].form.update(self, name, x, result)
        return result.to(out_dtype)

    # --- merging ------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' ΔW into the base weight. Merging an adapter twice warns and does nothing."""
        names = self.active_adapters if adapter_names is None else adapter_names
        if not isinstance(self.base_layer.weight, nn.Parameter):
            raise ValueError(f"cannot merge in place into a {type(self.base_layer).__name__} (quantized) weight; "
                             "use merge_and_unload(), which dequantizes first")
        weight = self.base_layer.weight
        for name in names:
            if name not in self.adapters:
                continue
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged; merging it again is a no-op")
                continue
            adapter = self.adapters[name]
            with torch.no_grad():
                merged, adapter.merge_state = adapter.form.merged(self, name, weight)
                weight.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ΔW (last merged first). A no-op when nothing is merged."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            adapter = self.adapters[name]
            with torch.no_grad():
                weight.copy_(adapter.form.unmerged(self, name, weight, adapter.merge_state))
            adapter.merge_state = None


class LoraLinear(LoraLayer):
    """nn.Linear, NF4Linear or transformers' Conv1D (fan_in_fan_out) + adapters of any form."""

    geometry = "linear"

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:  # nn.Linear, or a quantized linear exposing the same attributes
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = self.container("lora_A", nn.ModuleDict)
        self.lora_B = self.container("lora_B", nn.ModuleDict)

    def make_pair(self, name, r):
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def pair(self, name):
        return self.lora_A[name].weight, self.lora_B[name].weight

    def lowrank(self, h, name, A, B):
        return F.linear(F.linear(h, A), B)

    def add_update(self, result, x, name, A, B, s):
        after_A = F.linear(self.lora_dropout[name](x.to(A.dtype)), A)
        if result.dtype != after_A.dtype:
            return result + F.linear(after_A, B) * s
        # result + s * after_A @ B^T in one kernel: no separate scale and add passes.
        rows = result.numel() // result.shape[-1]  # explicit: after_A may have 0 columns (AdaLoRA rank 0)
        flat = torch.addmm(result.reshape(rows, -1), after_A.reshape(rows, after_A.shape[-1]), B.T, alpha=s)
        return flat.view(result.shape)

    def delta(self, A, B, s):
        return LF.linear_delta(A, B, s, self.fan_in_fan_out)

    def base_apply(self, h, weight):
        return F.linear(h, weight)

    def channel_dims(self, x):
        return 0

    mixed_update = staticmethod(mixed_linear_update)

    def _fused_ok(self, x: torch.Tensor, names: list[str]) -> bool:
        base = self.base_layer
        return (len(names) == 1 and self.adapters[names[0]].form.fusable and type(base) is nn.Linear
                and torch.is_grad_enabled() and x.dtype == base.weight.dtype
                and not torch.is_autocast_enabled(x.device.type))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self._unmerged_active() if self.row_adapters is None else []
        if names and self._fused_ok(x, names):
            A, B, s = self.effective_factors(names[0])
            drop = self.lora_dropout[names[0]]
            return fused_lora_linear(x, self.base_layer.weight, self.base_layer.bias, A, B, s,
                                     drop.p if isinstance(drop, nn.Dropout) else 0.0, self.training)
        return super().forward(x, *args, **kwargs)


class LoraEmbedding(LoraLayer):
    """nn.Embedding + adapters (A is a lookup table, as in PEFT and loralib)."""

    geometry = "embedding"

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = self.container("lora_embedding_A")
        self.lora_embedding_B = self.container("lora_embedding_B")

    def make_pair(self, name, r):
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, r))

    def pair(self, name):
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def reset_pair(self, name, gaussian=False):
        A, B = self.pair(name)  # PEFT: A zero, B normal
        nn.init.zeros_(A)
        nn.init.normal_(B)

    def lowrank(self, ids, name, A, B):
        base = self.base_layer
        after_A = F.embedding(ids, A.T, padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        return after_A @ B.T

    def lowrank_update(self, ids, name, A, B, s):
        """s · B A[:, ids], times the base's `embed_scale` where it has one (Gemma's scaled embeddings)."""
        update = self.lowrank(ids, name, A, B) * s
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        return update if embed_scale is None else update * torch.as_tensor(embed_scale).to(update.dtype)

    def delta(self, A, B, s):
        return LF.embedding_delta(A, B, s)

    mixed_update = staticmethod(mixed_embedding_update)


class LoraConv(LoraLayer):
    """nn.Conv1d / Conv2d / Conv3d + adapters: A is a conv with the base kernel, B a 1x1 conv."""

    geometry = "conv"

    def __init__(self, base_layer: nn.modules.conv._ConvNd):
        if base_layer.groups != 1:
            raise ValueError(
                f"LoRA on grouped convolutions is not supported (groups={base_layer.groups}); "
                "exclude this module or target a conv with groups=1"
            )
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.lora_A = self.container("lora_A", nn.ModuleDict)
        self.lora_B = self.container("lora_B", nn.ModuleDict)

    def make_pair(self, name, r):
        base = self.base_layer
        conv = type(base)
        ones = (1,) * len(base.kernel_size)
        self.lora_A[name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                 dilation=base.dilation, bias=False)
        self.lora_B[name] = conv(r, self.out_features, ones, ones, bias=False)

    def pair(self, name):
        return self.lora_A[name].weight, self.lora_B[name].weight

    def lowrank(self, h, name, A, B):
        return self.lora_B[name]._conv_forward(self.lora_A[name]._conv_forward(h, A, None), B, None)

    def delta(self, A, B, s):
        return LF.conv_delta(A, B, s)

    def base_apply(self, h, weight):
        return self.base_layer._conv_forward(h, weight, None)

    def channel_dims(self, x):
        return x.dim() - 2

    @staticmethod
    def mixed_update(layer, x, row_adapters):
        raise ValueError("mixed-adapter batches are not supported for convolution layers")


# Base layer type -> LoRA wrapper (the first match wins).
LAYER_TYPES: list[tuple[type, type]] = [
    (NF4Linear, LoraLinear), (nn.Linear, LoraLinear), (Conv1D, LoraLinear), (nn.Embedding, LoraEmbedding),
    (nn.Conv1d, LoraConv), (nn.Conv2d, LoraConv), (nn.Conv3d, LoraConv)]


def lora_layer_class(module: nn.Module) -> type | None:
    for base_type, lora_type in LAYER_TYPES:
        if isinstance(module, base_type):
            return lora_type
    return None
