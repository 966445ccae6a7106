"""trainable_token_indices: retrain chosen rows of an embedding table (new special tokens, a chat template's
markers) without training, or saving, the whole table.

PEFT's layout, so state dicts and files match: `<name>.token_adapter.base_layer` is the frozen module,
`<name>.token_adapter.trainable_tokens_delta.<adapter>` the trained rows (n_tokens, dim) — the rows' new
values, not a difference, despite PEFT's name — and files hold `<name>.token_adapter.trainable_tokens_delta`.
An output head tied to the input embedding (same weight tensor) gets a wrapper that shares the same rows, so
the tie survives training and merging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import replace_module
from .peft_layer_api import merge_candidates

DELTA_KEY = "token_adapter.trainable_tokens_delta"


class BufferDict(nn.Module):
    """Tensors by adapter name that move with the module (`.to()`) but stay out of state_dict."""

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]


class TrainableTokensLayer(nn.Module):
    """The rows per adapter; a layer made with `tied` shares another layer's rows (tied output head)."""

    def __init__(self, base_layer: nn.Module, tied: "TrainableTokensLayer | None" = None):
        super().__init__()
        self.base_layer = base_layer
        self.is_tied = tied is not None
        self.trainable_tokens_delta = tied.trainable_tokens_delta if tied else nn.ParameterDict()
        self.trainable_tokens_original = tied.trainable_tokens_original if tied else BufferDict()
        self.token_indices: dict[str, list[int]] = tied.token_indices if tied else {}

    def add(self, name: str, indices: list[int]) -> None:
        if self.is_tied:
            return  # the rows live in the layer this one is tied to
        weight = self.base_layer.weight
        rows = len(weight)
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < rows]
        if bad or not indices:
            raise ValueError(f"trainable_token_indices must be a non-empty list of token ids in [0, {rows}), "
                             f"got {list(indices)!r}" + (f" (bad: {bad[:5]})" if bad else ""))
        values = weight.detach()[torch.tensor(indices, device=weight.device)].clone()
        self.trainable_tokens_delta[name] = nn.Parameter(values.clone())
        self.trainable_tokens_original[name] = values
        self.token_indices[name] = list(indices)

    def remove(self, name: str) -> None:
        if not self.is_tied and name in self.token_indices:
            del self.trainable_tokens_delta[name]
            del self.trainable_tokens_original[name]
            del self.token_indices[name]

    def check_disjoint(self, names: list[str]) -> None:
        seen: set[int] = set()
        for name in names:
            rows = set(self.token_indices[name])
            if seen & rows:
                raise ValueError(f"Token indices of adapter {name} are already defined and would result in "
                                 "undefined merging behavior. Only disjunct token indices are currently supported.")
            seen |= rows

    def weight_with(self, names: list[str]) -> torch.Tensor:
        """The base weight with the rows of adapters `names` written in (differentiable in the rows)."""
        weight = self.base_layer.weight
        for name in names:
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight))
        return weight

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's function with `weight` in place of its own."""
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                              base.sparse)
            scale = getattr(base, "embed_scale", None)  # Gemma's scaled embeddings
            return out if scale is None else out * torch.as_tensor(scale).to(out.dtype)
        return F.linear(x, weight, getattr(base, "bias", None))


class TrainableTokensWrapper(nn.Module):
    """An embedding (or tied output head) whose chosen rows are trained per adapter."""

    def __init__(self, module: nn.Module, tied_to: "TrainableTokensWrapper | None" = None):
        super().__init__()
        if not isinstance(module, (nn.Embedding, nn.Linear)):
            raise TypeError(f"trainable_token_indices cannot be applied to modules of type {type(module)}")
        self.token_adapter = TrainableTokensLayer(module, tied_to.token_adapter if tied_to else None)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.row_adapters: list[str | None] | None = None

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The weight the module computes with (the active adapters' rows written in), as in PEFT."""
        return self.token_adapter.weight_with(self._live(self.active_adapters))

    @property
    def adapter_names(self) -> list[str]:
        return list(self.token_adapter.token_indices)

    @property
    def _adapters(self) -> set[str]:
        """PEFT's AuxiliaryTrainingWrapper attribute: the adapters this wrapper holds."""
        return set(self.token_adapter.token_indices)

    def add_adapter(self, name: str, indices: list[int]) -> None:
        self.token_adapter.add(name, indices)
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"Cannot delete adapter(s) {[name]} while they are merged. Please unmerge them first.")
        self.token_adapter.remove(name)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def check_active(self, names: list[str]) -> None:
        """PEFT's rule: one trainable-tokens adapter active at a time on a module."""
        present = [n for n in names if n in self.token_adapter.token_indices]
        if len(present) > 1:
            raise ValueError(f"Only one adapter can be set at a time for TrainableTokensWrapper "
                             f"({type(self.original_module).__name__}), got {len(present)}: {present}")

    def set_active_adapters(self, names: list[str]) -> None:
        self.check_active(names)
        self.active_adapters = list(names)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The rows under their file key; a tied head owns none (its rows are the embedding's)."""
        if self.token_adapter.is_tied or name not in self.token_adapter.token_indices:
            return {}
        return {DELTA_KEY: self.token_adapter.trainable_tokens_delta[name]}

    def _live(self, names: list[str]) -> list[str]:
        return [n for n in names if n in self.token_adapter.token_indices and n not in self.merged_adapters]

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Write the adapters' rows into the base weight (undone by unmerge)."""
        names = self.active_adapters if adapter_names is None else adapter_names
        names = merge_candidates(self.merged_adapters, [n for n in names if n in self.token_adapter.token_indices])
        self.token_adapter.check_disjoint(self.merged_adapters + names)
        weight = self.token_adapter.base_layer.weight
        with torch.no_grad():
            merged = self.token_adapter.weight_with(names)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {names} seems to be broken")
            weight.copy_(merged)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        weight = self.token_adapter.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            index = torch.tensor(self.token_adapter.token_indices[name], device=weight.device)
            with torch.no_grad():
                weight.index_copy_(0, index, self.token_adapter.trainable_tokens_original[name].to(weight))

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def unwrapped(self, use_trained_copy: bool, adapter_names: list[str] | None = None) -> nn.Module:
        """The base module, with the adapters' rows merged in (`use_trained_copy`) or restored."""
        if use_trained_copy:
            self.merge(adapter_names)
        else:
            self.unmerge()
        return self.token_adapter.base_layer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self.token_adapter
        if self.disable_adapters:
            return layer.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:  # mixed batch: each row with its own adapter's rows
            out = layer.base_layer(x, *args, **kwargs)
            for name in sorted(set(self._live([n for n in self.row_adapters if n is not None]))):
                rows = torch.tensor([i for i, n in enumerate(self.row_adapters) if n == name], device=x.device)
                out[rows] = layer.compute(x[rows], layer.weight_with([name])).to(out.dtype)
            return out
        names = self._live(self.active_adapters)
        if not names:
            return layer.base_layer(x, *args, **kwargs)
        layer.check_disjoint(self.merged_adapters + names)
        return layer.compute(x, layer.weight_with(names))


def add_trainable_tokens(model: nn.Module, name: str, indices: list[int], adapter_name: str,
                         tied_head: str | None = None) -> None:
    """Wrap module `name` (once) and add the adapter's rows; `tied_head` (the output head sharing this
    embedding's weight, as weight_tying.py found it) is wrapped too, sharing the rows, so the tie holds."""
    module = model.get_submodule(name)
    if not isinstance(module, TrainableTokensWrapper):
        module = TrainableTokensWrapper(module)
        replace_module(model, name, module)
    module.add_adapter(adapter_name, indices)
    if tied_head is None:
        return
    head = model.get_submodule(tied_head)
    if not isinstance(head, TrainableTokensWrapper):
        head = TrainableTokensWrapper(head, tied_to=module)
        replace_module(model, tied_head, head)
    if head.token_adapter.is_tied:
        head.add_adapter(adapter_name, indices)
