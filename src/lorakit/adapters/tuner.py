"""LoraTuner: what PEFT calls `peft_model.base_model` — the module that holds the transformers model as
`.model`, so parameter names start `base_model.model.` as in PEFT."""

from __future__ import annotations

from torch import nn

from ..utils import forward_getattr


class LoraTuner(nn.Module):
    """PEFT's `peft_model.base_model`: holds the transformers model as `.model`; every other attribute is the
    LoraModel's (so `model.base_model.set_adapter([...])`, `.merge_and_unload()`, ... work as in PEFT)."""

    def __init__(self, model: nn.Module, owner: nn.Module):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_owner", owner)  # not a submodule: no cycle in modules() / state_dict()

    def __getattr__(self, name: str):
        return forward_getattr(super().__getattr__, name,
                               lambda: None if name.startswith("__") else self.__dict__.get("_owner"))

    def forward(self, *args, **kwargs):
        return self.__dict__["_owner"].forward(*args, **kwargs)
