"""LoRA layers: each wraps (never subclasses) a base layer and adds named low-rank adapters.

Parameter names are PEFT's (`base_layer`, `lora_A`, `lora_B`, `lora_embedding_A`,
`lora_embedding_B`) so a state dict maps one to one onto PEFT's adapter files.
Merging is an explicit, idempotent call; nothing happens as a side effect of train()/eval().
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as LF
from .kernels import fused_lora_linear
from .multi import mixed_embedding_update, mixed_linear_update

try:  # GPT-2 style layers: a Linear that stores its weight as (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()


class LoraLayer(nn.Module):
    """Adapter bookkeeping shared by every wrapped layer type."""

    adapter_layer_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.row_adapters: list[str | None] | None = None  # set by LoraModel for mixed-adapter batches

    # --- hooks each layer type implements ----------------------------------------------
    def _create_adapter(self, name: str, r: int) -> None:
        raise NotImplementedError

    def _init_adapter(self, name: str, init_lora_weights: bool | str) -> None:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter `name`, shaped like the base weight."""
        raise NotImplementedError

    # --- adapter lifecycle ------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def weight(self) -> torch.Tensor:
        # Code that reads `module.weight` (dtype/device probes, tied-weight checks) sees the base weight.
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    init_lora_weights: bool | str = True, use_rslora: bool = False) -> None:
        if name in self.r:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = LF.lora_scaling(lora_alpha, r, use_rslora)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._create_adapter(name, r)
        self._init_adapter(name, init_lora_weights)
        # Adapters live on the base layer's device, in fp32 (stable optimisation for bf16/fp16 bases).
        device = next(iter([*self.base_layer.parameters(), *self.base_layer.buffers()])).device
        for layer_name in self.adapter_layer_names:
            getattr(self, layer_name)[name].to(device=device, dtype=torch.float32)
        if not self.active_adapters:
            self.active_adapters = [name]
        self.train(self.base_layer.training)  # new dropout modules follow the model's train/eval mode

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting")
        for layer_name in (*self.adapter_layer_names, "lora_dropout"):
            container = getattr(self, layer_name)
            if name in container:
                del container[name]
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active_adapters(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.r]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """{'lora_A.weight': p, ...}: the adapter's parameters under their file-format names."""
        out = {}
        for layer_name in self.adapter_layer_names:
            container = getattr(self, layer_name)
            if name not in container:
                continue
            item = container[name]
            if isinstance(item, nn.Parameter):
                out[layer_name] = item
            else:
                out.update({f"{layer_name}.{k}": p for k, p in item.named_parameters()})
        return out

    def _unmerged_active(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]

    def _mixed_forward(self, x, update_fn, *args, **kwargs):
        if self.merged_adapters:
            raise ValueError("mixed-adapter batches need unmerged adapters; call unmerge_adapter() first")
        result = self.base_layer(x, *args, **kwargs)
        update = None if self.disable_adapters else update_fn(self, x, self.row_adapters)
        return result if update is None else (result + update).to(result.dtype)

    # --- merging ------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' ΔW into the base weight. Merging an adapter twice warns and does nothing."""
        names = self.active_adapters if adapter_names is None else adapter_names
        if not isinstance(self.base_layer.weight, nn.Parameter):
            raise ValueError(f"cannot merge in place into a {type(self.base_layer).__name__} (quantized) weight; "
                             "use merge_and_unload(), which dequantizes first")
        weight = self.base_layer.weight
        for name in names:
            if name not in self.r:
                continue
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged; merging it again is a no-op")
                continue
            with torch.no_grad():
                weight.copy_(LF.merge(weight, self.delta_weight(name)))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ΔW (last merged first). A no-op when nothing is merged."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                weight.copy_(LF.unmerge(weight, self.delta_weight(name)))


class LoraLinear(LoraLayer):
    """nn.Linear (or transformers' Conv1D with fan_in_fan_out) + low-rank update."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D) if Conv1D else False
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:  # nn.Linear, or a quantized linear exposing the same attributes
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_adapter(self, name, r):
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def _init_adapter(self, name, init_lora_weights):
        if isinstance(init_lora_weights, str) and init_lora_weights != "gaussian":
            raise ValueError(f"init_lora_weights={init_lora_weights!r} (PiSSA/OLoRA) is not implemented yet; "
                             "use True, 'gaussian' or False")
        if init_lora_weights is False:
            return  # both matrices keep nn.Linear's random init: the adapter is not a no-op
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def delta_weight(self, name):
        d = LF.linear_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                            self.fan_in_fan_out)
        return d.to(self.base_layer.weight.dtype)

    def _fused_ok(self, x: torch.Tensor, names: list[str]) -> bool:
        base = self.base_layer
        return (len(names) == 1 and type(base) is nn.Linear and torch.is_grad_enabled()
                and x.dtype == base.weight.dtype and not torch.is_autocast_enabled(x.device.type))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._mixed_forward(x, mixed_linear_update, *args, **kwargs)
        names = self._unmerged_active()
        if names and self._fused_ok(x, names):
            name = names[0]
            drop = self.lora_dropout[name]
            return fused_lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[name].weight,
                                     self.lora_B[name].weight, self.scaling[name],
                                     drop.p if isinstance(drop, nn.Dropout) else 0.0, self.training)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in names:
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(lora_A.weight.dtype))
            after_A = lora_A(h)
            if result.dtype == after_A.dtype:
                # result + s * after_A @ B^T in one kernel: no separate scale and add passes.
                flat = torch.addmm(result.reshape(-1, result.shape[-1]), after_A.reshape(-1, after_A.shape[-1]),
                                   lora_B.weight.T, alpha=self.scaling[name])
                result = flat.view(result.shape)
            else:
                result = result + lora_B(after_A) * self.scaling[name]
        return result.to(out_dtype)

class LoraEmbedding(LoraLayer):
    """nn.Embedding + low-rank update (A is a lookup table, as in PEFT and loralib)."""

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create_adapter(self, name, r):
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, r))

    def _init_adapter(self, name, init_lora_weights):
        if init_lora_weights is False:
            return
        nn.init.zeros_(self.lora_embedding_A[name])
        nn.init.normal_(self.lora_embedding_B[name])

    def delta_weight(self, name):
        d = LF.embedding_delta(self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name])
        return d.to(self.base_layer.weight.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._mixed_forward(x, mixed_embedding_update, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        base = self.base_layer
        embed_scale = getattr(base, "embed_scale", None)  # e.g. Gemma's scaled embeddings
        for name in self._unmerged_active():
            after_A = F.embedding(x, self.lora_embedding_A[name].T, padding_idx=base.padding_idx,
                                  max_norm=base.max_norm, norm_type=base.norm_type,
                                  scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
            update = (after_A @ self.lora_embedding_B[name].T) * self.scaling[name]
            if embed_scale is not None:
                update = update * torch.as_tensor(embed_scale).to(update.dtype)
            result = result + update
        return result.to(out_dtype)


class LoraConv(LoraLayer):
    """nn.Conv1d / Conv2d / Conv3d + low-rank update: A is a conv with the base kernel, B a 1x1 conv."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.modules.conv._ConvNd):
        if base_layer.groups != 1:
            raise ValueError(
                f"LoRA on grouped convolutions is not supported (groups={base_layer.groups}); "
                "exclude this module or target a conv with groups=1"
            )
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_adapter(self, name, r):
        base = self.base_layer
        conv = type(base)
        ones = (1,) * len(base.kernel_size)
        self.lora_A[name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                 dilation=base.dilation, bias=False)
        self.lora_B[name] = conv(r, self.out_features, ones, ones, bias=False)

    _init_adapter = LoraLinear._init_adapter

    def delta_weight(self, name):
        d = LF.conv_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
        return d.to(self.base_layer.weight.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            raise ValueError("mixed-adapter batches are not supported for convolution layers")
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self._unmerged_active():
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(lora_A.weight.dtype))
            result = result + lora_B(lora_A(h)) * self.scaling[name]
        return result.to(out_dtype)


def _layer_types() -> list[tuple[type, type]]:
    from .quant.nf4 import NF4Linear

    types: list[tuple[type, type]] = [(NF4Linear, LoraLinear), (nn.Linear, LoraLinear), (nn.Embedding, LoraEmbedding),
                                      (nn.Conv1d, LoraConv), (nn.Conv2d, LoraConv), (nn.Conv3d, LoraConv)]
    if Conv1D:
        types.append((Conv1D, LoraLinear))
    return types


# Base layer type -> LoRA wrapper. Other modules (e.g. quantized linears) register here.
LAYER_TYPES: list[tuple[type, type]] = _layer_types()


def register_layer_type(base_type: type, lora_type: type) -> None:
    LAYER_TYPES.insert(0, (base_type, lora_type))


def lora_layer_class(module: nn.Module) -> type | None:
    for base_type, lora_type in LAYER_TYPES:
        if isinstance(module, base_type):
            return lora_type
    return None
