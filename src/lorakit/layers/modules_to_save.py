"""modules_to_save: a fully trainable copy of a module per adapter (e.g. a new classifier head).

PEFT's layout, so state dicts and files match: `<name>.original_module` holds the frozen
module, `<name>.modules_to_save.<adapter>` the trainable copy; files store the copy's
parameters under `<name>.<param>`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModulesToSaveWrapper(nn.Module):
    adapter_layer_names = ("modules_to_save",)  # PEFT's attributes: where per-adapter state lives
    other_param_names = ()

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.row_adapters: list[str | None] | None = None

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def check_active(self, names: list[str]) -> None:
        """PEFT's rule: a module copy replaces the module, so only one adapter's copy can be active."""
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(f"Only one adapter can be set at a time for ModulesToSaveWrapper: {present} each hold "
                             "a trained copy of this module (copies replace the module, they do not add up)")

    def set_active_adapters(self, names: list[str]) -> None:
        self.check_active(names)
        self.active_adapters = [n for n in names if n in self.modules_to_save]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    @property
    def _adapters(self) -> set[str]:
        """PEFT's AuxiliaryTrainingWrapper attribute: the adapters this wrapper holds."""
        return set(self.modules_to_save)

    def _current(self) -> nn.Module:
        if self.disable_adapters or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    @property
    def weight(self) -> torch.Tensor:
        return self._current().weight

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        if name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[name].named_parameters())

    def unwrapped(self, use_trained_copy: bool, adapter_names: list[str] | None = None) -> nn.Module:
        return self._current() if use_trained_copy else self.original_module

    def forward(self, x, *args, **kwargs):
        if self.row_adapters is None or self.disable_adapters:
            return self._current()(x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs)  # mixed batch: each row through its adapter's copy
        for name in sorted({n for n in self.row_adapters if n in self.modules_to_save}):
            rows = torch.tensor([i for i, n in enumerate(self.row_adapters) if n == name], device=x.device)
            out[rows] = self.modules_to_save[name](x[rows], *args, **kwargs)
        return out
