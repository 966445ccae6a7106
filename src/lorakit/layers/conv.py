"""LoraConv: nn.Conv1d / Conv2d / Conv3d with adapters. A is a conv with the base kernel, B a 1x1 conv."""

from __future__ import annotations

import warnings

from torch import nn

from .. import functional as LF
from .base import LoraLayer
from .mixed_batch import mixed_grouped_update


class LoraConv(LoraLayer):
    """nn.Conv1d / Conv2d / Conv3d + adapters: A is a conv with the base kernel, B a 1x1 conv."""

    geometry = "conv"

    def __init__(self, base_layer: nn.modules.conv._ConvNd):
        if base_layer.groups > 1:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def make_pair(self, name, r, bias=False):
        """A as a convolution of the base's kernel, B as a 1x1 (grouped like the base) convolution."""
        base = self.base_layer
        conv = type(base)
        ones = (1,) * len(base.kernel_size)
        self.container("lora_A", nn.ModuleDict)[name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                 dilation=base.dilation, bias=False)
        # Grouped convs (PEFT's layout): A is a full conv, B a grouped 1x1 conv. B A is then not a weight of the
        # base's grouped shape, so such an adapter cannot be merged.
        self.container("lora_B", nn.ModuleDict)[name] = conv(r, self.out_features, ones, ones, groups=base.groups, bias=bias)

    @staticmethod
    def check_rank(target: str, base: nn.Module, r: int) -> None:
        """Grouped convolutions need a rank divisible by the groups (ValueError, as in PEFT)."""
        if r % base.groups:
            raise ValueError(f"Targeting a {type(base).__name__} with groups={base.groups} and rank {r}. "
                             "Currently, support is limited to conv layers where the rank is divisible by groups. "
                             f"Either choose a different rank or do not target this specific layer ({target!r}).")

    def pair(self, name):
        """The (A, B) weights of adapter `name`."""
        return self.matrix("lora_A", name), self.matrix("lora_B", name)

    def lowrank(self, h, name, A, B):
        """B(A(h)) as two convolutions."""
        return self.lora_B[name]._conv_forward(self.lora_A[name]._conv_forward(h, A, None), B, None)

    def delta(self, A, B, s):
        """ΔW = s · B A as a convolution weight (refused for grouped convolutions)."""
        if self.base_layer.groups > 1:
            raise ValueError(f"merging (and ΔW) is not supported for a grouped convolution (groups="
                             f"{self.base_layer.groups}), as in PEFT; keep the adapter unmerged")
        return LF.conv_delta(A, B, s)

    def norm_delta(self, name):
        """Grouped convs have no ΔW of the base's shape (B A mixes all input channels into each group), so DoRA's
        norm takes PEFT's stand-in: s · B(-1, r) @ A(r, -1) reshaped to W's shape; adapters then load and compute
        as in PEFT. Ungrouped: the true ΔW."""
        if self.base_layer.groups == 1:
            return super().norm_delta(name)
        A, B, s = self.effective_factors(name)
        r = A.shape[0]
        return (B.float().reshape(-1, r) @ A.float().reshape(r, -1)).reshape(self.base_layer.weight.shape) * s

    def base_apply(self, h, weight):
        """The base convolution with `weight` in place of its own (bias left out)."""
        return self.base_layer._conv_forward(h, weight, None)

    def channel_dims(self, x):
        """How many trailing dimensions follow the channel dimension of `x` (the spatial ones)."""
        return x.dim() - 2

    mixed_update = staticmethod(mixed_grouped_update)
