"""Plain LoRA (Hu et al. 2021): ΔW = s·B A, s = alpha/r (alpha/sqrt(r) with rsLoRA).

Initialisation as in PEFT: A Kaiming-uniform (N(0, 1/r) for "gaussian"), B zero, so ΔW starts at 0
(embeddings: A zero, B normal); PiSSA / OLoRA take W's principal part into A, B and leave the residual
in the base weight (see svd_init.py).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import functional as LF
from ..layers.form import AdapterForm
from ..utils import PeftWarning
from .svd_init import olora_factors, parse_init, pissa_factors


class LoraForm(AdapterForm):
    fusable = True
    # nn.MultiheadAttention and bare parameters (target_parameters): plain LoRA only, as in PEFT
    geometries = (*AdapterForm.geometries, "attention", "parameter")

    def __init__(self, init_lora_weights: bool | str = True, use_rslora: bool = False, lora_bias: bool = False):
        self.init_lora_weights = init_lora_weights
        self.use_rslora = use_rslora
        self.lora_bias = lora_bias
        if lora_bias:  # the fused kernel and the mixed-batch stacks carry no bias term
            self.fusable = self.mixable = False

    @property
    def svd_init(self) -> bool:
        init = self.init_lora_weights
        return isinstance(init, str) and (init.startswith("pissa") or init.lower() == "olora")

    def scaling(self, r, lora_alpha):
        return LF.lora_scaling(lora_alpha, r, self.use_rslora)

    def check_target(self, target, base, geometry):
        super().check_target(target, base, geometry)
        if self.svd_init and type(base) not in (nn.Linear, Conv1D):
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r} needs float Linear / Conv1D targets "
                             f"(it rewrites the base weight); target {target!r} is {type(base).__name__}")
        if self.lora_bias and geometry == "embedding":
            raise ValueError(f"lora_bias=True is not supported for Embedding layers (target {target!r}), as in PEFT; "
                             "narrow target_modules or set lora_bias=False")
        if self.lora_bias and getattr(base, "bias", None) is None:
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type {type(base).__name__} has no "
                          f"bias ({target!r}). This means that merging LoRA weights won't be possible.", PeftWarning)

    def create(self, layer, name):
        layer.make_pair(name, layer.adapters[name].r, bias=self.lora_bias)
        init = self.init_lora_weights
        if init is False:
            return  # random values everywhere: the adapter is not a no-op (for tests)
        if self.svd_init:
            self._init_from_weight(layer, name)
        else:
            layer.reset_pair(name, gaussian=isinstance(init, str) and init.lower() == "gaussian")
        if self.lora_bias:
            nn.init.zeros_(self.output_bias(layer, name))

    def factors(self, layer, name):
        A, B = layer.pair(name)
        return A, B, layer.adapters[name].scaling

    def output_bias(self, layer, name):
        return layer.lora_B[name].bias if self.lora_bias else None

    def tensors(self, layer, name):
        bias = self.output_bias(layer, name)
        return [*layer.pair(name), *([bias] if bias is not None else [])]

    def update(self, layer, name, x, result):
        result = super().update(layer, name, x, result)
        bias = self.output_bias(layer, name)
        if bias is None:
            return result
        return result + (bias * layer.adapters[name].scaling).view(-1, *[1] * layer.channel_dims(result))

    def merged(self, layer, name, weight):
        self._shift_base_bias(layer, name, +1)
        return super().merged(layer, name, weight)

    def unmerged(self, layer, name, weight, state):
        self._shift_base_bias(layer, name, -1)
        return super().unmerged(layer, name, weight, state)

    def _shift_base_bias(self, layer, name, sign):
        bias = self.output_bias(layer, name)
        if bias is None:
            return
        base_bias = getattr(layer.base_layer, "bias", None)
        if base_bias is None:
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        base_bias.data += (sign * layer.adapters[name].scaling * bias).to(base_bias.dtype)

    def _init_from_weight(self, layer, name):
        """PiSSA / OLoRA: the adapter takes W's principal part; the base keeps the residual."""
        base = layer.base_layer
        init = self.init_lora_weights
        if not isinstance(base.weight, nn.Parameter) or not base.weight.is_floating_point():
            raise ValueError(f"init_lora_weights={init!r} needs a float base weight, not {type(base).__name__}; "
                             "initialise before quantizing")
        method, niter = parse_init(init)
        adapter = layer.adapters[name]
        weight = layer.oriented_weight().detach()
        if method == "pissa":
            A0, B0, residual = pissa_factors(weight, adapter.r, adapter.scaling, niter)
        else:
            A0, B0, residual = olora_factors(weight, adapter.r, adapter.scaling)
        A, B = layer.pair(name)
        with torch.no_grad():
            A.copy_(A0)
            B.copy_(B0)
            base.weight.copy_(layer.stored_orientation(residual).to(base.weight.dtype))
