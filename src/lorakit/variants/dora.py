"""DoRA (weight-decomposed LoRA, Liu et al. 2024) as pure functions.

W' = m · (W + s·BA) / ||W + s·BA||_c, with the column norm (one per output unit) treated as a
constant in backward (the paper's §4.3 memory-saving form, as PEFT does). The layer computes

    out = base(x) + (m/n - 1) · W x + (m/n) · s · B A x,       n = ||W + s·BA||_c  (detached)

which equals W' x + bias without ever forming W'. `DoraForm` wraps another form's update this way.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.form import AdapterForm


def magnitude_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """PEFT's stored shape: (d_out,) for linear layers, (1, c_out, 1, ...) for convolutions."""
    return (weight.shape[0],) if weight.dim() == 2 else (1, weight.shape[0], *([1] * (weight.dim() - 2)))


def weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-output-unit L2 norm of W + ΔW, shape (d_out,). W is (d_out, d_in, *kernel); computed in fp32."""
    full = weight.float() + delta.float()
    return full.flatten(1).norm(p=2, dim=1)


def magnitude_scale(magnitude: torch.Tensor, norm: torch.Tensor, ndim: int) -> torch.Tensor:
    """m / n, broadcastable over an output whose channel axis is -1 (ndim == 0: linear) or 1 (conv)."""
    scale = magnitude.reshape(-1) / norm.detach()
    return scale if ndim == 0 else scale.view(1, -1, *([1] * ndim))


def dora_update(base_out_nobias: torch.Tensor, lora_out: torch.Tensor, scale: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """The amount DoRA adds to base(x): (m/n - 1)·Wx + (m/n)·s·BAx."""
    return (scale - 1) * base_out_nobias + scale * lora_out * scaling


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', n): the merged DoRA weight and the norm needed to undo it. Shapes as `weight`; fp32."""
    norm = weight_norm(weight, delta)
    factor = (magnitude.float().reshape(-1) / norm).view(-1, *([1] * (weight.dim() - 1)))
    return factor * (weight.float() + delta.float()), norm


def unmerged_weight(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                    norm: torch.Tensor) -> torch.Tensor:
    """Inverse of `merged_weight`: W = W' · n/m - ΔW."""
    factor = (magnitude.float().reshape(-1) / norm).view(-1, *([1] * (merged.dim() - 1)))
    return merged.float() / factor - delta.float()


class DoraForm(AdapterForm):
    """DoRA around another form (plain LoRA): its factors give ΔW, a magnitude vector per output unit
    (`lora_magnitude_vector`, PEFT's name) rescales W + ΔW."""

    label = "DoRA"
    geometries = ("linear", "conv", "embedding")
    mixable = False  # the weight norm is per adapter: such rows cannot share a batch with other adapters

    def __init__(self, inner: AdapterForm):
        self.inner = inner

    def scaling(self, r, lora_alpha):
        return self.inner.scaling(r, lora_alpha)

    def check_target(self, target, base, geometry):
        if geometry == "attention":
            raise ValueError(f"MultiheadAttention does not support DoRA (yet), please set use_dora to False (target "
                             f"{target!r})")
        if geometry not in self.geometries:
            raise ValueError("use_dora=True: DoRA supports Linear, Conv1D, Embedding and Conv1d/2d/3d layers; "
                             f"target {target!r} is {type(base).__name__}; exclude it or set use_dora=False")
        self.inner.check_target(target, base, geometry)

    def create(self, layer, name):
        self.inner.create(layer, name)
        with torch.no_grad():  # magnitude starts at ||W + ΔW||, so the adapter starts as a no-op (PEFT's init)
            weight = layer.oriented_weight()
            norm = weight_norm(weight, layer.norm_delta(name).to(weight.device))
        layer.add_param("lora_magnitude_vector", name, norm.view(magnitude_shape(weight)))

    def factors(self, layer, name):
        return self.inner.factors(layer, name)

    def file_key(self, key):
        return self.inner.file_key(key)

    def update(self, layer, name, x, result):
        """(m/n - 1)·W h + (m/n)·s·BA h with h = dropout(x). Without active dropout W h is `result` minus
        the bias; with it, W is applied to the dropped-out input."""
        A, B, s = self.factors(layer, name)
        if layer.geometry == "embedding":  # token ids in, no dropout, no bias: (m/n) · (base(x) + ΔW x), as PEFT
            norm = weight_norm(layer.oriented_weight().float(), layer.norm_delta(name).detach())
            scale = magnitude_scale(layer.lora_magnitude_vector[name], norm, 0)
            return scale * (result + layer.lowrank_update(x, name, A, B, s))
        drop = layer.lora_dropout[name]
        h = drop(x.to(torch.float32))
        weight = layer.oriented_weight().to(torch.float32)
        norm = weight_norm(weight, layer.norm_delta(name).detach())
        channel_dims = layer.channel_dims(x)
        scale = magnitude_scale(layer.lora_magnitude_vector[name], norm, channel_dims)
        bias = getattr(layer.base_layer, "bias", None)
        if isinstance(drop, nn.Identity) or not layer.training:
            base_out = result.to(torch.float32)
            if bias is not None:
                base_out = base_out - bias.float().view(-1, *[1] * channel_dims)
        else:
            base_out = layer.base_apply(h, weight)
        lora_out = layer.lowrank(h.to(A.dtype), name, A, B).float()  # fp16/bf16 adapters (autocast off): their dtype
        return result + dora_update(base_out, lora_out, scale, s)

    def merged(self, layer, name, weight):
        merged, norm = merged_weight(layer.oriented_weight(), layer.oriented_delta(name),
                                     layer.lora_magnitude_vector[name])
        return layer.stored_orientation(merged), norm

    def unmerged(self, layer, name, weight, norm):
        base = unmerged_weight(layer.oriented_weight(), layer.oriented_delta(name), layer.lora_magnitude_vector[name],
                               norm)
        return layer.stored_orientation(base)
