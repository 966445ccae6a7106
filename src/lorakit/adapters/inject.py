"""The one injector: puts adapters on the modules and parameters a config targets (targets.py finds them, as
PEFT does), with modules_to_save copies, trainable token rows and tied weights, and swaps LoRA layers out again."""

from __future__ import annotations


from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..layers import LoraLayer, lora_layer_class
from ..layers.modules_to_save import ModulesToSaveWrapper
from ..layers.parameter import LoraParameter
from ..layers.trainable_tokens import add_trainable_tokens
from ..quant.nf4 import NF4Linear
from ..utils import replace_module
from ..variants.default_targets import CONDENSE_FROM, condensed_targets, fill_default_targets
from ..variants.lora_config import LoraConfig
from .moe_targets import convert_moe_targets
from .targets import (ALL_LINEAR, WRAPPERS, all_linear_names, base_of, find_modules_to_save, find_parameter_targets,
                      find_targets, trainable_token_targets)
from .weight_tying import apply_tying, plan_tying

def _add_parameter_adapter(model: nn.Module, module_name: str, param_name: str, adapter_name: str, form,
                           config: LoraConfig) -> None:
    """Add the adapter on one parameter, reusing the wrapper an earlier adapter put on it, else wrapping the module
    (outside any wrapper already on it: nesting as PEFT's)."""
    module = model.get_submodule(module_name)
    wrapper = module
    while isinstance(wrapper, LoraParameter) and wrapper.parameter_name != param_name:
        wrapper = wrapper.base_layer
    if not isinstance(wrapper, LoraParameter):
        wrapper = LoraParameter(module, param_name)
        replace_module(model, module_name, wrapper)
    wrapper.add_adapter(adapter_name, form, **config.layer_kwargs(f"{module_name}.{param_name}"))


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Add adapter `adapter_name` to every targeted module (wrapping it on first use). Returns the names."""
    fill_default_targets(model, config, config.DEFAULT_TARGETS)
    if config.PEFT_TYPE == "LORA":
        convert_moe_targets(model, config, all_linear_names)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        config.target_modules = sorted(all_linear_names(model, config.task_type))  # PEFT saves the names too
    if isinstance(config.target_modules, list) and len(config.target_modules) >= CONDENSE_FROM:
        config.target_modules = condensed_targets(config.target_modules, [n for n, _ in model.named_modules()])
    targets, saved, token_targets = find_targets(model, config), find_modules_to_save(model, config), \
        trainable_token_targets(model, config)
    tie, targets, saved, token_targets = plan_tying(model, config, targets, saved, token_targets)
    for name, _ in token_targets:
        module = model.get_submodule(name)
        if name in targets or isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            kind = lora_layer_class(module) if name in targets else type(module)
            raise TypeError(f"trainable_token_indices cannot be applied to modules of type {kind} ({name!r} is "
                            "also a LoRA target or in modules_to_save); target one or the other")
    bases = [base_of(model.get_submodule(n)) for n in targets]
    form = config.adapter_form([_in_out(b) for b in bases])
    for name, base in zip(targets, bases):  # refuse undefined form/layer pairs before any module is touched
        form.check_target(name, base, lora_layer_class(base).geometry)
        lora_layer_class(base).check_rank(name, base, config.rank_for(name))
    param_targets = find_parameter_targets(model, config, targets)
    for name, param_name in param_targets:
        LoraParameter.check_settings(f"{name}.{param_name}", config)
        form.check_target(f"{name}.{param_name}", model.get_submodule(name), LoraParameter.geometry)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            module = lora_layer_class(module)(module)
            replace_module(model, name, module)
        module.add_adapter(adapter_name, form, **config.layer_kwargs(name))
    for name, param_name in param_targets:
        _add_parameter_adapter(model, name, param_name, adapter_name, form, config)
    for name in saved:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            replace_module(model, name, module)
        module.add_adapter(adapter_name)
    for name, indices in token_targets:
        head = tie.head if tie.tokens and name == tie.embedding else None
        add_trainable_tokens(model, name, indices, adapter_name, tied_head=head)
    apply_tying(model, tie, adapter_name)
    return targets + [f"{n}.{p}" for n, p in param_targets]


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, 3 * module.embed_dim
    return module.in_features, module.out_features


def adapter_layers(model: nn.Module):
    """(name, module) for every LoRA layer, modules_to_save wrapper and trainable-tokens wrapper in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WRAPPERS)]


def unwrap(model: nn.Module, merge: bool, adapter_names: list[str] | None = None, safe_merge: bool = False,
           progressbar: bool = False) -> nn.Module:
    """Replace every LoRA layer by its base layer (merging its adapters first if `merge`)."""
    # innermost first: a LoRA layer may hold another (nn.MultiheadAttention's out_proj)
    for name, module in tqdm(adapter_layers(model)[::-1], disable=not progressbar, unit="module", desc="merging"):
        if isinstance(module, LoraLayer):
            if merge:
                if isinstance(module.base_layer, NF4Linear):  # merge into a dequantized float copy
                    module.base_layer = module.base_layer.to_linear(module.base_layer.compute_dtype)
                module.merge(adapter_names, safe_merge=safe_merge)
            else:
                module.unmerge()
            replace_module(model, name, module.base_layer)
        else:
            replace_module(model, name, module.unwrapped(use_trained_copy=merge, adapter_names=adapter_names))
    return model
