"""LoraParameter: LoRA on one bare nn.Parameter of a module — PEFT's `target_parameters` (its ParamWrapper).

Mixture-of-experts blocks keep their experts as 3-D parameters (Mixtral, Qwen-MoE, OLMoE:
`experts.gate_up_proj` (E, 2F, H), `experts.down_proj` (E, H, F)), used as `F.linear(x, W[e])`; there is no
nn.Linear per expert to wrap. As in PEFT (same names, shapes, files and outputs):
  - one LoraParameter per targeted parameter; several on one module nest (the parameter registered first is
    innermost), so the file keys read `experts.base_layer.lora_A.weight` for the inner one;
  - a parameter (E, d1, d2) has d_in = d2, d_out = d1 (d_in = d1, d_out = d2 where the module says
    `is_transposed`); a 2-D one is (d_out, d_in) with E = 1;
  - A: (E·r, d_in), B: (d_out, E·r); expert e's pair is A rows [e·r, (e+1)·r) and B columns e, E+e, 2E+e, ...
    (PEFT's reshapes: A -> (E, r, d_in), B -> (d_out, r, E)); ΔW[e] = s · B_e A_e;
  - the forward runs the module with W + ΔW (PEFT parametrizes the weight; here the sum goes to
    torch.func.functional_call, so nothing is written and gradients reach A and B);
  - no lora_dropout (there is no x to drop out before A), no lora_bias, no DoRA, no mixed-adapter batches.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .base import LoraLayer
from .linear import LoraLinear


class LoraParameter(LoraLayer):
    """Adapters on `base_layer.<parameter_name>` (a module, or another LoraParameter on the same module)."""

    geometry = "parameter"
    peft_class = "ParamWrapper"

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = tuple(self.base_weight().shape)
        if len(shape) == 3:
            self.num_experts, d1, d2 = shape
            transposed = getattr(self.target_module(), "is_transposed", False)
            self.in_features, self.out_features = (d1, d2) if transposed else (d2, d1)
            self.delta_order = "e r i, o r e -> e i o" if transposed else "e r i, o r e -> e o i"
        elif len(shape) == 2:
            self.num_experts, self.delta_order = 1, None
            self.out_features, self.in_features = shape
        else:
            raise ValueError(f"LoRA on a parameter needs a 2-D or 3-D one; {parameter_name!r} has shape {shape}")

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, in_features={self.in_features}, " \
               f"out_features={self.out_features}"

    @staticmethod
    def check_settings(target: str, config) -> None:
        """PEFT's refusals for parameter targets (before any module is touched)."""
        refused = {"lora_dropout != 0": config.lora_dropout, "lora_bias=True": config.lora_bias,
                   "use_dora=True": config.use_dora, "fan_in_fan_out=True": config.fan_in_fan_out}
        for setting, value in refused.items():
            if value:
                raise ValueError(f"target_parameters ({target!r}) does not work with {setting}, as in PEFT: the "
                                 "update is applied through the weight")

    def _innermost(self) -> tuple[int, nn.Module]:
        """(how many LoRA wrappers lie between self and the module, the module holding the parameter)."""
        depth, module = 0, self.base_layer
        while isinstance(module, LoraParameter):
            depth, module = depth + 1, module.base_layer
        return depth, module

    def target_module(self) -> nn.Module:
        return self._innermost()[1]

    def base_weight(self) -> torch.Tensor:
        return getattr(self.target_module(), self.parameter_name)

    def _path(self) -> str:
        """The parameter's name as seen from self.base_layer (through nested wrappers)."""
        return "base_layer." * self._innermost()[0] + self.parameter_name

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # what code written for the wrapped module reads from it (num_experts, act_fn, ...)
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def make_pair(self, name, r, bias=False):
        self.container("lora_A", nn.ModuleDict)[name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.container("lora_B", nn.ModuleDict)[name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)

    pair = LoraLinear.pair  # A and B as a Linear keeps them (lora_A.<name>.weight, lora_B.<name>.weight)

    def delta(self, A, B, s):
        if self.delta_order is None:
            return (B @ A) * s
        r = A.shape[0] // self.num_experts
        return torch.einsum(self.delta_order, A.reshape(self.num_experts, r, -1),
                            B.reshape(B.shape[0], r, self.num_experts)) * s

    def add_adapter(self, name, form, r, lora_alpha, lora_dropout=0.0):
        super().add_adapter(name, form, r, lora_alpha, 0.0)

    @staticmethod
    def mixed_update(layer, x, row_adapters):
        raise TypeError("LoRA on target_parameters does not support mixed adapter batches (as in PEFT).")

    def forward(self, *args, **kwargs):
        if self.row_adapters is not None:
            self.mixed_update(self, None, self.row_adapters)
        names = self._unmerged_active()
        if not names:
            return self.base_layer(*args, **kwargs)
        weight = self.base_weight()
        updated = weight + sum(self.delta(*self.effective_factors(n)) for n in names).to(weight.dtype)
        return functional_call(self.base_layer, {self._path(): updated}, args, kwargs, strict=False)
