"""Sibling projections that read the same input, trained as one matmul: q/k/v and gate/up.

A Llama-style block calls q_proj(x), k_proj(x), v_proj(x) (and gate_proj(x), up_proj(x)) on one hidden
state: three base GEMMs, three A products, three B updates forward, and as many again backward. Inside
`grouped_projections(model)` the frozen base weights of each such group are concatenated once into one
tensor (each layer's weight becomes a view of it: no extra memory) and the adapters' A factors and
(block-diagonal, scaled) B factors are stacked per call, so the whole group runs through the fused LoRA
kernel once: forward and backward each do one base GEMM and one input-gradient GEMM per group.

The attention/MLP code is not touched: the first member called computes the group's output for its input
and keeps the other members' slices; a sibling called with that same tensor takes its slice. A member
called with another input (cross-attention, a reordered call) disables its group for good, and every
call that is not plain single-adapter LoRA training (eval, merged or several adapters, dropout, mixed
batches, a quantized or cast base) takes the layer's own path. On leaving the context the weights become
separate tensors again (safe to save or merge).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..kernels import fused_lora_linear
from ..kernels.saved_activations import keep_exact
from ..layers.linear import LoraLinear

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # siblings that read one input


class ProjectionGroup:
    """LoraLinear siblings whose base weights are views of one concatenated weight (and bias)."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        bases = [m.base_layer for m in members]
        self.sizes = [b.weight.shape[0] for b in bases]
        with torch.no_grad():  # Parameters (frozen): saved-activation hooks leave them as they are
            self.weight = nn.Parameter(torch.cat([b.weight for b in bases]), requires_grad=False)
            has_bias = any(b.bias is not None for b in bases)
            self.bias = nn.Parameter(torch.cat([b.bias if b.bias is not None else b.weight.new_zeros(n)
                                                for b, n in zip(bases, self.sizes)]), requires_grad=False
                                     ) if has_bias else None
        self._point_members_at(self.weight, self.bias)
        self.enabled = True
        self._drop_pending()
        for m in members:
            m.projection_group = self

    def _point_members_at(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        for m, part in zip(self.members, weight.split(self.sizes)):
            m.base_layer.weight = nn.Parameter(part, requires_grad=False)
        if bias is not None:
            for m, part in zip(self.members, bias.split(self.sizes)):
                if m.base_layer.bias is not None:
                    m.base_layer.bias = nn.Parameter(part, requires_grad=False)

    def release(self) -> None:
        """Give every member its own weight (and bias) tensor again and detach the group."""
        for m in self.members:
            base = m.base_layer
            base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
            if base.bias is not None:
                base.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
            m.projection_group = None
        self._drop_pending()

    def _drop_pending(self) -> None:
        self.pending: dict[int, torch.Tensor] = {}   # id(member) -> its slice of the last group output
        self.pending_input: torch.Tensor | None = None

    def _groupable(self, x: torch.Tensor) -> str | None:
        """The one adapter every member trains with, when the grouped kernel computes their outputs exactly: each
        member's own fused kernel would train it (LoraLinear.fused_adapter), and no dropout draws a mask."""
        names = {m.fused_adapter(x, m._unmerged_active()) if m.row_adapters is None else None for m in self.members}
        if len(names) != 1 or None in names:
            return None
        name = names.pop()
        for m in self.members:
            drop = m.lora_dropout[name]
            if isinstance(drop, nn.Dropout) and drop.p > 0 and m.training:
                return None
        return name

    def output(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """`member`'s output for `x` from the grouped kernel, or None (the caller takes its own path)."""
        if not self.enabled:
            return None
        if self.pending_input is x and id(member) in self.pending:
            out = self.pending.pop(id(member))
            if not self.pending:
                self.pending_input = None
            return out
        if self.pending:  # a sibling's slice was never taken: these layers do not share their input
            self.enabled = False
            self._drop_pending()
            return None
        name = self._groupable(x)
        if name is None:
            return None
        outputs = self._forward(x, name)
        mine = outputs.pop(id(member))
        self.pending, self.pending_input = outputs, x
        return mine

    def _forward(self, x: torch.Tensor, name: str) -> dict[int, torch.Tensor]:
        factors = [m.effective_factors(name) for m in self.members]
        A = torch.cat([a for a, _, _ in factors])
        scales = {s for _, _, s in factors}
        if len(scales) == 1:
            B, s = torch.block_diag(*[b for _, b, _ in factors]), scales.pop()
        else:
            B, s = torch.block_diag(*[b * si for _, b, si in factors]), 1.0
        keep_exact(A)  # stacked adapter factors: saved for backward as they are, like the factors themselves
        keep_exact(B)
        out = fused_lora_linear(x, self.weight, self.bias, A, B, s, 0.0, True)
        return {id(m): part for m, part in zip(self.members, out.split(self.sizes, dim=-1))}


def find_groups(model: nn.Module) -> list[list[nn.Module]]:
    """Sibling LoraLinears named as in GROUPS (same parent, plain nn.Linear bases of one dtype and device)."""
    groups = []
    for parent in model.modules():
        for names in GROUPS:
            members = [parent._modules.get(n) for n in names]  # children only (wrappers forward getattr)
            if not all(isinstance(m, LoraLinear) and type(m.base_layer) is nn.Linear for m in members):
                continue
            if any(p.requires_grad for m in members for p in m.base_layer.parameters()):
                continue  # a trained base weight or bias (bias="all" / "lora_only") keeps its own parameter
            weights = [m.base_layer.weight for m in members]
            if len({(w.dtype, w.device, w.shape[1]) for w in weights}) == 1 and weights[0].is_floating_point():
                groups.append(members)
    return groups


@contextlib.contextmanager
def grouped_projections(model: nn.Module, enabled: bool = True):
    """Within the context, q/k/v and gate/up siblings train as one matmul each (see the module docstring).

    >>> with grouped_projections(model):  # doctest: +SKIP
    ...     loss = model(**batch).loss; loss.backward()
    """
    groups = [ProjectionGroup(members) for members in find_groups(model)] if enabled else []
    try:
        yield groups
    finally:
        for group in groups:
            group.release()
