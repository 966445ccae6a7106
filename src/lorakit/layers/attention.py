"""LoraMultiheadAttention: torch's nn.MultiheadAttention with LoRA on its input and output projections.

nn.MultiheadAttention keeps the q/k/v projection as one bare parameter (`in_proj_weight`, (3E, E)) and reads
`out_proj.weight` directly instead of calling out_proj, so there is no Linear forward to add an update to.
As in PEFT (same parameter names, files and outputs): the layer holds the in-projection's adapter
(A: (r, E), B: (3E, r)) and `out_proj` becomes a LoraLinear holding the out-projection's; the forward runs
the attention with W + ΔW for both (PEFT merges and unmerges around the call; here the sum goes to
torch.func.functional_call, so nothing is written and gradients flow to A and B). Like PEFT: q, k, v of
the same size only (`_qkv_same_embed_dim`), no lora_dropout (the update is applied through the weight),
no DoRA, no mixed-adapter batches.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..utils import forward_getattr
from .base import LoraLayer
from .linear import LoraLinear


class LoraMultiheadAttention(LoraLayer):
    """nn.MultiheadAttention + adapters on in_proj (here) and out_proj (a nested LoraLinear)."""

    geometry = "attention"
    peft_class = "MultiheadAttention"
    # What code written for nn.MultiheadAttention reads from the module (TransformerEncoderLayer, users).
    PASSTHROUGH = ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "head_dim", "in_proj_weight",
                   "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "_qkv_same_embed_dim", "merge_masks")

    def __init__(self, base_layer: nn.MultiheadAttention):
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("Only same embed for query/key/value is supported as of now for MultiheadAttention "
                             "(_qkv_same_embed_dim=True); give kdim=vdim=embed_dim or target other modules")
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError(f"out_proj must be an nn.Linear for LoRA on nn.MultiheadAttention, "
                            f"got {type(base_layer.out_proj).__name__}")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.embed_dim, 3 * base_layer.embed_dim
        base_layer.out_proj = LoraLinear(base_layer.out_proj)

    def __getattr__(self, name: str):
        return forward_getattr(super().__getattr__, name,
                               lambda: self.base_layer if name in LoraMultiheadAttention.PASSTHROUGH else None)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.in_proj_bias

    @property
    def out_proj(self) -> LoraLinear:
        return self.base_layer.out_proj

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    def add_adapter(self, name, form, r, lora_alpha, lora_dropout=0.0):
        if getattr(form, "lora_bias", False):
            raise ValueError("lora_bias=True is not supported for nn.MultiheadAttention targets")
        super().add_adapter(name, form, r, lora_alpha, 0.0)  # the update goes through the weight: no dropout
        self.out_proj.add_adapter(name, form, r, lora_alpha, 0.0)

    # in_proj's adapter has a Linear's geometry: A (r, E), B (3E, r)
    make_pair, pair, lowrank, delta, channel_dims = (LoraLinear.make_pair, LoraLinear.pair, LoraLinear.lowrank,
                                                    LoraLinear.delta, LoraLinear.channel_dims)

    @staticmethod
    def mixed_update(layer, x, row_adapters):
        raise TypeError("lora.MultiheadAttention does not support mixed adapter batches.")

    def forward(self, query: torch.Tensor, *args, **kwargs):
        if self.row_adapters is not None:
            self.mixed_update(self, query, self.row_adapters)
        names = self._unmerged_active()
        out_names = self.out_proj._unmerged_active()
        if not names and not out_names:
            return self.base_layer(query, *args, **kwargs)
        weights = {}
        if names:
            weights["in_proj_weight"] = self.base_layer.in_proj_weight + sum(
                self.delta(*self.effective_factors(n)).to(query.dtype) for n in names)
        if out_names:
            out = self.out_proj
            weights["out_proj.base_layer.weight"] = out.base_layer.weight + sum(
                out.delta(*out.effective_factors(n)).to(query.dtype) for n in out_names)
        return functional_call(self.base_layer, weights, (query, *args), kwargs, strict=False)
