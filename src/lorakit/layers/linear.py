"""LoraLinear: nn.Linear, NF4Linear or transformers' Conv1D (fan_in_fan_out) with adapters of any form.

A: (r, d_in), B: (d_out, r), W: (d_out, d_in) [(d_in, d_out) for Conv1D]. A single plain LoRA adapter
trains through the fused kernel (kernels/lora_linear.py); otherwise each adapter's form adds its update.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import functional as LF
from ..kernels import fused_lora_linear
from ..kernels.saved_activations import keep_exact
from ..quant.nf4 import DENSE_WEIGHTS, NF4Linear, is_plain_linear
from .base import LoraLayer
from .mixed_batch import mixed_linear_update


def frozen_weight(base: nn.Module):
    """What the fused kernel takes as the frozen weight of `base`: an nn.Linear's weight (or a subclass computing
    exactly what nn.Linear does, Falcon's), a Conv1D's weight transposed (a view, saved for backward as the
    parameter itself would be), an NF4Linear's dequantization (a callable; cached between forward and backward by
    DENSE_WEIGHTS), else None (no fused path)."""
    if is_plain_linear(base):
        return base.weight
    if isinstance(base, Conv1D):  # x @ W + b with W (d_in, d_out): nn.Linear's product with W^T
        return keep_exact(base.weight.T)
    if isinstance(base, NF4Linear):
        return functools.partial(DENSE_WEIGHTS.get, base)
    return None


def compute_dtype(base: nn.Module) -> torch.dtype:
    return base.compute_dtype if isinstance(base, NF4Linear) else base.weight.dtype


class LoraLinear(LoraLayer):
    """nn.Linear, NF4Linear or transformers' Conv1D (fan_in_fan_out) + adapters of any form."""

    geometry = "linear"
    peft_class = "Linear"
    projection_group = None  # a projection_groups.ProjectionGroup while q/k/v (gate/up) train as one matmul

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:  # nn.Linear, or a quantized linear exposing the same attributes
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def make_pair(self, name, r, bias=False):
        """lora_A (r x in) and lora_B (out x r, with a bias for lora_bias) as nn.Linear modules."""
        self.container("lora_A", nn.ModuleDict)[name] = nn.Linear(self.in_features, r, bias=False)
        self.container("lora_B", nn.ModuleDict)[name] = nn.Linear(r, self.out_features, bias=bias)

    def pair(self, name):
        """The (A, B) weights of adapter `name`."""
        return self.matrix("lora_A", name), self.matrix("lora_B", name)

    def lowrank(self, h, name, A, B):
        """B A h as two linear maps."""
        return F.linear(F.linear(h, A), B)

    def add_update(self, result, x, name, A, B, s):
        """`result` + s · B A dropout(x): PEFT's op order under autocast (same roundings), else one addmm."""
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # Autocast (Trainer/TRL with bf16=True) rounds each op's output: PEFT's order of ops, so the same
            # roundings, so the same numbers as PEFT in the same loop. PEFT casts x to A's dtype (fp32) and autocast
            # casts it back for the matmul: without dropout that round trip is the identity, so it is skipped.
            drop = self.lora_dropout[name]
            identity_round_trip = x.dtype == torch.get_autocast_dtype(device) and isinstance(drop, nn.Identity)
            h = x if identity_round_trip else drop(x.to(A.dtype))
            return result + F.linear(F.linear(h, A), B) * s
        after_A = F.linear(self.lora_dropout[name](x.to(A.dtype)), A)
        if result.dtype != after_A.dtype:
            return result + F.linear(after_A, B) * s
        # result + s * after_A @ B^T in one kernel: no separate scale and add passes.
        rows = result.numel() // result.shape[-1]  # explicit: after_A may have 0 columns (AdaLoRA rank 0)
        flat = torch.addmm(result.reshape(rows, -1), after_A.reshape(rows, after_A.shape[-1]), B.T, alpha=s)
        return flat.view(result.shape)

    def delta(self, A, B, s):
        """ΔW = s · B A (transposed for fan_in_fan_out layers such as GPT-2's Conv1D)."""
        return LF.linear_delta(A, B, s, self.fan_in_fan_out)

    def base_apply(self, h, weight):
        """The base linear map with `weight` in place of its own (bias left out)."""
        return F.linear(h, weight)

    def channel_dims(self, x):
        """Linear layers have their features last: no trailing dimensions."""
        return 0

    mixed_update = staticmethod(mixed_linear_update)

    def fused_adapter(self, x, names) -> str | None:
        """The adapter the fused kernel trains for input `x` (one plain LoRA adapter on a base `frozen_weight`
        covers, gradients on, x in the base's compute dtype, no autocast), else None."""
        base = self.base_layer
        if (len(names) == 1 and self.adapters[names[0]].form.fusable and frozen_weight(base) is not None
                and torch.is_grad_enabled() and x.dtype == compute_dtype(base)
                and not torch.is_autocast_enabled(x.device.type)):
            return names[0]
        return None

    def fused_forward(self, x, names):
        """Training with one plain LoRA adapter on an nn.Linear: base + update in one autograd function."""
        if self.projection_group is not None:
            grouped = self.projection_group.output(self, x)
            if grouped is not None:
                return grouped
        if self.fused_adapter(x, names) is None:
            return None
        base = self.base_layer
        A, B, s = self.effective_factors(names[0])
        drop = self.lora_dropout[names[0]]
        return fused_lora_linear(x, frozen_weight(base), base.bias, A, B, s,
                                 drop.p if isinstance(drop, nn.Dropout) else 0.0, self.training)
