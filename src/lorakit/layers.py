"""LoRA layers: each wraps (never subclasses) a base layer and adds named low-rank adapters.

Parameter names are PEFT's (`base_layer`, `lora_A`, `lora_B`, `lora_embedding_A`,
`lora_embedding_B`) so a state dict maps one to one onto PEFT's adapter files.
Merging is an explicit, idempotent call; nothing happens as a side effect of train()/eval().

Variants are per-adapter choices on the same layers (`kind` and `use_dora`), not subclasses:
  lora     ΔW = s·B A                         (+ DoRA's magnitude vector when use_dora)
  adalora  ΔW = s·B diag(E) A, s = alpha / init_r   (PEFT's SVD form; E is masked by the rank allocator)
  vera     ΔW = diag(λ_b) B_shared diag(λ_d) A_shared, A/B frozen random projections shared by all layers
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as LF
from .kernels import fused_lora_linear
from .variants import dora
from .variants.svd_init import olora_factors, parse_init, pissa_factors
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
        self.kind: dict[str, str] = {}        # "lora" | "adalora" | "vera"
        self.use_dora: dict[str, bool] = {}
        self._dora_merge_norm: dict[str, torch.Tensor] = {}  # weight norm at merge time, needed to unmerge

    # --- hooks each layer type implements ----------------------------------------------
    def _create_adapter(self, name: str, r: int, **variant) -> None:
        raise NotImplementedError

    def _init_adapter(self, name: str, init_lora_weights: bool | str, **variant) -> None:
        raise NotImplementedError

    def delta_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW of adapter `name`, shaped like the base weight, in `dtype` (default: the base weight's)."""
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
                    init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False,
                    kind: str = "lora", **variant) -> None:
        """Create adapter `name`. `kind` picks the variant; `variant` holds its extras
        (adalora: init_r; vera: projections, d_initial)."""
        if name in self.r:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if kind not in self.supported_kinds or (use_dora and not self.supports_dora):
            what = "DoRA" if use_dora and kind == "lora" else kind
            raise ValueError(f"{what} is not supported on {type(self.base_layer).__name__} layers")
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.kind[name] = kind
        self.use_dora[name] = use_dora
        if kind == "adalora":  # PEFT: scaling = alpha, divided by ranknum (= init_r) + 1e-5 in forward
            self.scaling[name] = lora_alpha / (variant.get("init_r", r) + 1e-5)
        else:
            self.scaling[name] = 1.0 if kind == "vera" else LF.lora_scaling(lora_alpha, r, use_rslora)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._create_adapter(name, r, **variant)
        self._init_adapter(name, init_lora_weights, **variant)
        self._to_base_device(name)
        if use_dora:  # magnitude starts at ||W + ΔW|| so the adapter starts as a no-op (PEFT's init)
            with torch.no_grad():
                weight = self._oriented_weight()
                norm = dora.weight_norm(weight, self._oriented_delta(name)).view(dora.magnitude_shape(weight))
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(weight.device))
        if not self.active_adapters:
            self.active_adapters = [name]
        self.train(self.base_layer.training)  # new dropout modules follow the model's train/eval mode

    supported_kinds: tuple[str, ...] = ("lora",)
    supports_dora = False

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

    def _oriented_weight(self) -> torch.Tensor:
        """The base weight as (d_out, d_in, *kernel), whatever the layer's storage convention."""
        weight = self.base_layer.weight
        return weight.T if getattr(self, "fan_in_fan_out", False) else weight

    def _oriented_delta(self, name: str) -> torch.Tensor:
        delta = self.delta_weight(name, dtype=torch.float32)
        return delta.T if getattr(self, "fan_in_fan_out", False) else delta

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting")
        for _, container, _ in self._adapter_items(name, extra=("lora_dropout",)):
            del container[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.kind, self.use_dora, self._dora_merge_norm):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active_adapters(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.r]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """{'lora_A.weight': p, ...}: the adapter's parameters under their file-format names."""
        out = {}
        for layer_name, _, item in self._adapter_items(name):
            if isinstance(item, nn.Parameter):
                out[layer_name] = item
            else:
                out.update({f"{layer_name}.{k}": p for k, p in item.named_parameters()})
        if self.kind.get(name) == "adalora":  # PEFT's AdaLoRA stores bare matrices: `lora_A`, not `lora_A.weight`
            out = {k.removesuffix(".weight"): p for k, p in out.items()}
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
                if self.use_dora.get(name):
                    merged, norm = dora.merged_weight(self._oriented_weight(), self._oriented_delta(name),
                                                      self.lora_magnitude_vector[name])
                    self._dora_merge_norm[name] = norm
                    weight.copy_(self._stored_orientation(merged))
                else:
                    weight.copy_(LF.merge(weight, self.delta_weight(name)))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ΔW (last merged first). A no-op when nothing is merged."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                if self.use_dora.get(name):
                    base = dora.unmerged_weight(self._oriented_weight(), self._oriented_delta(name),
                                                self.lora_magnitude_vector[name], self._dora_merge_norm.pop(name))
                    weight.copy_(self._stored_orientation(base))
                else:
                    weight.copy_(LF.unmerge(weight, self.delta_weight(name)))

    def _stored_orientation(self, oriented: torch.Tensor) -> torch.Tensor:
        return oriented.T if getattr(self, "fan_in_fan_out", False) else oriented

    def _dora_update(self, name: str, x: torch.Tensor, result: torch.Tensor, lora_out_fn, base_fn) -> torch.Tensor:
        """DoRA's addition to `result` = base(x): (m/n - 1)·W x + (m/n)·s·BA x with n = ||W + s·BA|| detached.

        Without active dropout W x is `result` minus the bias; with it, W is applied to the dropped-out x."""
        drop = self.lora_dropout[name]
        h = drop(x.to(torch.float32))
        weight = self._oriented_weight().to(torch.float32)
        norm = dora.weight_norm(weight, self._oriented_delta(name).detach())
        channel_dims = 0 if isinstance(self, LoraLinear) else x.dim() - 2
        scale = dora.magnitude_scale(self.lora_magnitude_vector[name], norm, channel_dims)
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(drop, nn.Identity) or not self.training:
            base_out = result.to(torch.float32)
            if bias is not None:
                base_out = base_out - (bias.float() if channel_dims == 0 else bias.float().view(1, -1, *[1] * channel_dims))
        else:
            base_out = base_fn(h, weight)
        return result + dora.dora_update(base_out, lora_out_fn(h), scale, self.scaling[name])


class LoraLinear(LoraLayer):
    """nn.Linear (or transformers' Conv1D with fan_in_fan_out) + low-rank update (LoRA, DoRA, AdaLoRA, VeRA)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E", "lora_magnitude_vector", "vera_lambda_b", "vera_lambda_d")
    supported_kinds = ("lora", "adalora", "vera")
    supports_dora = True

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D) if Conv1D else False
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:  # nn.Linear, or a quantized linear exposing the same attributes
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_E = nn.ParameterDict()                 # AdaLoRA singular values, (r, 1)
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA magnitudes, (d_out,)
        self.vera_lambda_b = nn.ParameterDict()          # VeRA scaling vectors, (d_out,) and (r,)
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_projections: dict[str, object] = {}    # name -> shared VeraProjections (not owned here)

    def _create_adapter(self, name, r, projections=None, **_):
        if self.kind[name] == "vera":
            projections.check_fits(self.in_features, self.out_features, r)
            self.vera_projections[name] = projections
            self.vera_lambda_b[name] = nn.Parameter(torch.ones(self.out_features))
            self.vera_lambda_d[name] = nn.Parameter(torch.randn(r))
            return
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)
        if self.kind[name] == "adalora":
            self.lora_E[name] = nn.Parameter(torch.randn(r, 1))

    def _init_adapter(self, name, init_lora_weights, d_initial=0.1, **_):
        kind = self.kind[name]
        if init_lora_weights is False:
            return  # random values everywhere: the adapter is not a no-op (for tests)
        if kind == "vera":
            nn.init.constant_(self.vera_lambda_d[name], d_initial)
            nn.init.zeros_(self.vera_lambda_b[name])
        elif kind == "adalora":
            nn.init.zeros_(self.lora_E[name])
            nn.init.normal_(self.lora_A[name].weight, std=0.02)
            nn.init.normal_(self.lora_B[name].weight, std=0.02)
        elif isinstance(init_lora_weights, str) and init_lora_weights != "gaussian":
            self._init_from_weight(name, init_lora_weights)
        else:
            _init_lora_pair(self.lora_A[name].weight, self.lora_B[name].weight, init_lora_weights, self.r[name])

    def _init_from_weight(self, name, init):
        """PiSSA / OLoRA: the adapter takes W's principal part; the base keeps the residual."""
        base = self.base_layer
        if not isinstance(base.weight, nn.Parameter) or not base.weight.is_floating_point():
            raise ValueError(f"init_lora_weights={init!r} needs a float base weight, not {type(base).__name__}; "
                             "initialise before quantizing")
        method, niter = parse_init(init)
        weight = self._oriented_weight().detach()
        if method == "pissa":
            A, B, residual = pissa_factors(weight, self.r[name], self.scaling[name], niter)
        else:
            A, B, residual = olora_factors(weight, self.r[name], self.scaling[name])
        with torch.no_grad():
            self.lora_A[name].weight.copy_(A)
            self.lora_B[name].weight.copy_(B)
            base.weight.copy_(self._stored_orientation(residual).to(base.weight.dtype))

    def _versions(self, name: str) -> tuple[int, ...]:
        """Identity and in-place write counter of each tensor adapter `name` computes with (a changed
        tuple means changed weights). Kept cheap: it runs per layer on every mixed-batch forward."""
        return tuple(v for t in self._factor_tensors(name) for v in (id(t), t._version))

    def _factor_tensors(self, name: str) -> list[torch.Tensor]:
        kind = self.kind[name]
        if kind == "vera":
            proj = self.vera_projections[name]
            return [self.vera_lambda_d[name], self.vera_lambda_b[name], proj.A, proj.B]
        tensors = [self.lora_A[name].weight, self.lora_B[name].weight]
        return tensors + [self.lora_E[name]] if kind == "adalora" else tensors

    def effective_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A', B', s) with ΔW = s · B' A' (oriented (d_out, d_in)), for every adapter kind."""
        kind = self.kind[name]
        if kind == "vera":
            proj = self.vera_projections[name]
            A = self.vera_lambda_d[name][:, None] * proj.A[:, : self.in_features]
            B = self.vera_lambda_b[name][:, None] * proj.B[: self.out_features]
            return A, B, 1.0
        A = self.lora_A[name].weight
        if kind == "adalora":
            A = A * self.lora_E[name]
        return A, self.lora_B[name].weight, self.scaling[name]

    def delta_weight(self, name, dtype=None):
        A, B, s = self.effective_factors(name)
        d = LF.linear_delta(A, B, s, self.fan_in_fan_out)
        return d.to(dtype or self.base_layer.weight.dtype)

    def _fused_ok(self, x: torch.Tensor, names: list[str]) -> bool:
        base = self.base_layer
        return (len(names) == 1 and self.kind[names[0]] == "lora" and not self.use_dora[names[0]]
                and type(base) is nn.Linear and torch.is_grad_enabled()
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
            if self.use_dora[name]:
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                result = self._dora_update(name, x, result, lambda h: lora_B(lora_A(h)), F.linear)
                continue
            if self.kind[name] != "lora":
                A, B, s = self.effective_factors(name)
                h = self.lora_dropout[name](x.to(A.dtype))
                result = result + F.linear(F.linear(h, A), B) * s
                continue
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


def _init_lora_pair(lora_A: torch.Tensor, lora_B: torch.Tensor, init_lora_weights, r: int) -> None:
    """PEFT's default: A Kaiming-uniform (or N(0, 1/r) for 'gaussian'), B zero, so ΔW starts at 0."""
    if init_lora_weights == "gaussian":
        nn.init.normal_(lora_A, std=1 / r)
    else:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    nn.init.zeros_(lora_B)


class LoraEmbedding(LoraLayer):
    """nn.Embedding + low-rank update (A is a lookup table, as in PEFT and loralib)."""

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create_adapter(self, name, r, **_):
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, r))

    def _init_adapter(self, name, init_lora_weights, **_):
        if init_lora_weights is False:
            return
        if isinstance(init_lora_weights, str) and init_lora_weights != "gaussian":
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is supported on Linear layers only")
        nn.init.zeros_(self.lora_embedding_A[name])
        nn.init.normal_(self.lora_embedding_B[name])

    def delta_weight(self, name, dtype=None):
        d = LF.embedding_delta(self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name])
        return d.to(dtype or self.base_layer.weight.dtype)

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

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    supports_dora = True

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
        self.lora_magnitude_vector = nn.ParameterDict()

    def _create_adapter(self, name, r, **_):
        base = self.base_layer
        conv = type(base)
        ones = (1,) * len(base.kernel_size)
        self.lora_A[name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                 dilation=base.dilation, bias=False)
        self.lora_B[name] = conv(r, self.out_features, ones, ones, bias=False)

    def _init_adapter(self, name, init_lora_weights, **_):
        if init_lora_weights is False:
            return
        if isinstance(init_lora_weights, str) and init_lora_weights != "gaussian":
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is supported on Linear layers only")
        _init_lora_pair(self.lora_A[name].weight, self.lora_B[name].weight, init_lora_weights, self.r[name])

    def delta_weight(self, name, dtype=None):
        d = LF.conv_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
        return d.to(dtype or self.base_layer.weight.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            raise ValueError("mixed-adapter batches are not supported for convolution layers")
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self._unmerged_active():
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            if self.use_dora[name]:
                conv = lambda h, w: self.base_layer._conv_forward(h, w, None)  # noqa: E731
                result = self._dora_update(name, x, result, lambda h: lora_B(lora_A(h)), conv)
                continue
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
