"""Plain LoRA (Hu et al. 2021): ΔW = s·B A, s = alpha/r (alpha/sqrt(r) with rsLoRA).

Initialisation as in PEFT: A Kaiming-uniform (N(0, 1/r) for "gaussian"), B zero, so ΔW starts at 0
(embeddings: A zero, B normal); PiSSA / OLoRA take W's principal part into A, B and leave the residual
in the base weight (see svd_init.py).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import functional as LF
from .form import AdapterForm
from .svd_init import olora_factors, parse_init, pissa_factors


class LoraForm(AdapterForm):
    fusable = True

    def __init__(self, init_lora_weights: bool | str = True, use_rslora: bool = False):
        self.init_lora_weights = init_lora_weights
        self.use_rslora = use_rslora

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

    def create(self, layer, name):
        layer.make_pair(name, layer.adapters[name].r)
        init = self.init_lora_weights
        if init is False:
            return  # random values everywhere: the adapter is not a no-op (for tests)
        if self.svd_init:
            self._init_from_weight(layer, name)
        else:
            layer.reset_pair(name, gaussian=isinstance(init, str) and init.lower() == "gaussian")

    def factors(self, layer, name):
        A, B = layer.pair(name)
        return A, B, layer.adapters[name].scaling

    def tensors(self, layer, name):
        return list(layer.pair(name))

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
