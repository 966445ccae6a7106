"""The base model's own state inside a model with adapters, under the base model's original keys (PEFT's
get_base_model_state_dict / set_base_model_state_dict): what FSDP set-ups and weight syncs load and save.

Adapter wrappers add infixes to the keys of what they wrap (`q_proj.base_layer.weight`,
`lm_head.original_module.weight`, `embed_tokens.token_adapter.base_layer.weight`); these helpers drop the
infixes and leave out the adapters' own tensors."""

from __future__ import annotations

from collections import namedtuple

import torch
from torch import nn

from ..layers import LoraLayer
from ..layers.modules_to_save import ModulesToSaveWrapper
from ..layers.trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
WRAPPED = ((LoraLayer, "base_layer"), (TrainableTokensLayer, "base_layer"), (ModulesToSaveWrapper, "original_module"),
           (TrainableTokensWrapper, "token_adapter"))  # wrapper type -> the child holding what it wraps


def _base_keys(module: nn.Module, original: str, actual: str, out: dict[str, str]) -> None:
    for wrapper, child in WRAPPED:
        if isinstance(module, wrapper):  # the wrapped module's keys, without the wrapper's infix
            return _base_keys(getattr(module, child), original, f"{actual}{child}.", out)
    for name, _ in module.named_parameters(recurse=False):
        out[original + name] = actual + name
    for name, _ in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            out[original + name] = actual + name
    for name, child in module.named_children():
        _base_keys(child, f"{original}{name}.", f"{actual}{name}.", out)


def base_key_map(model: nn.Module) -> dict[str, str]:
    """The base model's original state-dict key -> its key in the wrapped model (`model.base_model.model`)."""
    out: dict[str, str] = {}
    _base_keys(model.base_model.model, "", "", out)
    return out


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original keys, without adapter tensors (PEFT's function)."""
    state = model.base_model.model.state_dict()
    return {original: state[actual] for original, actual in base_key_map(model).items() if actual in state}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load a state dict keyed as the original base model into the wrapped model (PEFT's function); returns
    (missing_keys, unexpected_keys), and with `strict` raises RuntimeError when either is non-empty."""
    keys = base_key_map(model)
    unexpected = [k for k in state_dict if k not in keys]
    missing = [k for k in keys if k not in state_dict]
    if strict and (missing or unexpected):
        errors = ([f"Missing key(s) in state_dict: {missing}"] if missing else []) + \
                 ([f"Unexpected key(s) in state_dict: {unexpected}"] if unexpected else [])
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(errors))
    model.base_model.model.load_state_dict({keys[k]: v for k, v in state_dict.items() if k in keys}, strict=False)
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)
