"""AdaLoRA's layer side: its adapter form (ΔW = s·B diag(E) A), the layers that hold it, its orthogonality
regulariser, and shrinking layers to the kept singular triplets (PEFT's resize_modules_by_rank_pattern)."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..layers import LoraLayer
from ..layers.form import AdapterForm


class AdaLoraForm(AdapterForm):
    label = "ADALORA"
    geometries = ("linear", "conv")

    def __init__(self, config):  # its AdaLoraConfig
        self.config = config  # the allocator writes the kept triplets into config.rank_pattern while training

    def scaling(self, r, lora_alpha):  # PEFT: alpha / (ranknum + 1e-5), ranknum = init_r
        return lora_alpha / (self.config.init_r + 1e-5)

    def check_target(self, target, base, geometry):
        super().check_target(target, base, geometry)
        if geometry == "conv" and (not isinstance(base, nn.Conv2d) or base.groups > 1):
            raise ValueError(f"AdaLoRA supports Conv2d layers with groups=1 only (PEFT's SVDConv2d); target "
                             f"{target!r} is {type(base).__name__} with groups={base.groups}; narrow target_modules")

    def create(self, layer, name):
        """PEFT's SVDLinear / SVDConv2d layout: bare matrices lora_A (r, d_in; a conv's d_in is
        in_channels·kH·kW), lora_E (r, 1), lora_B (d_out, r), and a frozen, unsaved `ranknum` (= r)."""
        r = layer.adapters[name].r
        layer.add_param("lora_A", name, torch.randn(r, layer.in_features * _kernel_numel(layer)))
        layer.add_param("lora_E", name, torch.randn(r, 1))
        layer.add_param("lora_B", name, torch.randn(layer.out_features, r))
        layer.add_other("ranknum", name, torch.full((1,), float(r)))
        if self.config.init_lora_weights is False:
            return
        nn.init.zeros_(layer.lora_E[name])
        for factor in layer.pair(name):
            nn.init.normal_(factor, std=0.02)

    def file_key(self, key):  # PEFT stores bare matrices (`lora_A`); beside a LoRA adapter ours sit in modules
        return key.removesuffix(".weight")

    def factors(self, layer, name):
        """(diag(E) A, B, s); on a conv diag(E) A is shaped as a conv weight (r, in, kH, kW), so B @ it is ΔW."""
        A, B = layer.pair(name)
        A = A * layer.lora_E[name]
        if layer.geometry == "conv":
            A = A.reshape(A.shape[0], *layer.base_layer.weight.shape[1:])
        return A, B, layer.adapters[name].scaling

    def update(self, layer, name, x, result):
        """Linear: the low-rank product. Conv (as PEFT's SVDConv2d): the base convolution with ΔW as its kernel."""
        if layer.geometry != "conv":
            return super().update(layer, name, x, result)
        delta = layer.delta(*self.factors(layer, name))
        return result + layer.base_apply(layer.lora_dropout[name](x.to(delta.dtype)), delta)

    def tensors(self, layer, name):
        return [*layer.pair(name), layer.lora_E[name]]

    def to_file(self, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """Keep only the kept singular triplets (PEFT's truncated layout): rows of lora_A / lora_E,
        columns of lora_B, per `rank_pattern`."""
        out = dict(state)
        for key, mask in (self.config.rank_pattern or {}).items():
            module = pattern_module(key)
            keep = torch.tensor(mask, dtype=torch.bool)
            for part in ("lora_A", "lora_E", "lora_B"):
                full = f"{prefix}{module}.{part}"
                if full in out and out[full].shape[0 if part != "lora_B" else 1] == len(mask):
                    out[full] = out[full][:, keep] if part == "lora_B" else out[full][keep]
        return out


def _kernel_numel(layer) -> int:
    return layer.base_layer.weight[0, 0].numel() if layer.geometry == "conv" else 1


def pattern_module(key: str) -> str:
    """The module a rank_pattern key names: '<module>.lora_E' (saved) or '<module>.lora_E.<adapter>' (training)."""
    return re.sub(r"\.lora_E(\.[^.]+)?$", "", key)


def triplets(model, adapter_name: str):
    """(key, layer) for every layer holding AdaLoRA adapter `adapter_name`; key = '<module>.lora_E'."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [(f"{name}.lora_E", layer) for name, layer in base.named_modules()
            if isinstance(layer, LoraLayer) and isinstance(getattr(layer.adapters.get(adapter_name), "form", None),
                                                           AdaLoraForm)]


def orthogonal_regularization(model, adapter_name: str) -> torch.Tensor:
    """Mean over A and B matrices of ||P Pᵀ - I||_F (A rows, B columns orthonormal)."""
    terms = []
    for _, layer in triplets(model, adapter_name):
        A, B = layer.pair(adapter_name)
        for cov in (A @ A.T, B.T @ B):
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def resize_by_rank_pattern(model, rank_pattern: dict, adapter_name: str) -> None:
    """PEFT's `resize_modules_by_rank_pattern`: shrink each layer's adapter to its kept singular triplets
    (keys '<module>.lora_E[.<adapter>]', masks as lists of bools or tensors). Outputs do not change: the
    dropped triplets are the masked (E_i = 0) ones and the scaling stays alpha / init_r."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for key, mask in rank_pattern.items():
        if not isinstance(mask, (list, torch.Tensor)):
            raise TypeError(f"rank_pattern[{key!r}] must be a list of bools or a tensor, got {type(mask).__name__}")
        keep = torch.as_tensor(mask, dtype=torch.bool).view(-1)
        layer = base.get_submodule(pattern_module(key))
        A, B = layer.pair(adapter_name)
        E = layer.lora_E[adapter_name]
        keep = keep.to(E.device)
        for attr, kept in (("lora_A", A[keep]), ("lora_E", E[keep]), ("lora_B", B[:, keep])):
            layer.add_param(attr, adapter_name, kept.detach().clone())
            layer.matrix(attr, adapter_name).requires_grad_(E.requires_grad)
        layer.adapters[adapter_name].r = int(keep.sum())
