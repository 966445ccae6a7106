"""PEFT functions and base classes that transformers' adapter integration calls, on lorakit's layers:
`peft.functional.delete_adapter`, `peft.utils.other.AuxiliaryTrainingWrapper` (what modules_to_save copies and
trainable token rows are), `load_peft_weights`, and `fsdp_auto_wrap_policy`."""

from __future__ import annotations

import abc
import functools

from torch import nn

from ..adapters.inject import adapter_layers
from ..adapters.peft_format import read_adapter
from ..layers import LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper


class AuxiliaryTrainingWrapper(abc.ABC):
    """PEFT's base of the wrappers that train a module beside the LoRA layers (modules_to_save copies, trainable
    token rows): lorakit's two wrappers are registered as its subclasses."""


AuxiliaryTrainingWrapper.register(ModulesToSaveWrapper)
AuxiliaryTrainingWrapper.register(TrainableTokensWrapper)


def delete_adapter(model: nn.Module, adapter_name: str, prefix: str | None = None, layer_cls=None) -> list[str] | None:
    """Remove adapter `adapter_name` from every adapter layer of `model` (PEFT's functional API). Returns the
    adapters left active, as PEFT does; None when none of the layers held it."""
    held = [layer for _, layer in adapter_layers(model) if adapter_name in getattr(layer, "adapter_names", ())]
    for layer in held:
        layer.delete_adapter(adapter_name)
    return list(held[0].active_adapters) if held else None


def load_peft_weights(model_id: str, device: str | None = None, **_) -> dict:
    """The tensors of the adapter saved in directory `model_id`, under the file's keys (PEFT's function)."""
    _, state = read_adapter(model_id)
    return {k: v.to(device) for k, v in state.items()} if device else state


def fsdp_auto_wrap_policy(model: nn.Module):
    """PEFT's FSDP wrap policy: each decoder layer class transformers names in `_no_split_modules` is one unit,
    and every leaf module with trainable parameters (the adapters) its own, so frozen and trained parameters never
    share a flat parameter."""
    from torch.distributed.fsdp.wrap import (_or_policy,  # torch.distributed only here: FSDP runs
                                             lambda_auto_wrap_policy, transformer_auto_wrap_policy)

    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    layer_classes = {type(m) for m in model.modules() if type(m).__name__ in layer_names}
    layer_classes |= {LoraLayer}

    def trainable_leaf(module: nn.Module) -> bool:
        return (len(list(module.named_children())) == 0 and module.weight is not None
                and module.weight.requires_grad) if hasattr(module, "weight") else False

    return functools.partial(_or_policy, policies=[
        functools.partial(lambda_auto_wrap_policy, lambda_fn=trainable_leaf),
        functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_classes)])
