"""Reading and writing PEFT's adapter format.

A directory holds `adapter_config.json` and `adapter_model.safetensors` whose keys are
`base_model.model.<module path>.<lora param>` with the adapter name removed, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Writes are atomic
(temp file + rename); pickle `.bin` files load through torch's restricted unpickler (tensors only; full pickle
only with an explicit `allow_pickle=True`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import warnings

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..layers import LoraLayer
from ..utils import atomic_path
from ..variants.lora_config import CONFIG_NAME, LoraConfig
from ..variants.registry import read_config
from ..variants.svd_init import to_plain_lora
from .inject import adapter_layers
from .moe_targets import convert_old_expert_weights

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


def _adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """File key -> live parameter, for every parameter adapter `adapter_name` owns."""
    out = {}
    for name, module in adapter_layers(model):
        for suffix, param in module.adapter_parameters(adapter_name).items():
            out[f"{KEY_PREFIX}{name}.{suffix}"] = param
    return out


def adapter_form(model: nn.Module, adapter_name: str):
    """The form of adapter `adapter_name` (one object shared by all its layers), or None."""
    for _, module in adapter_layers(model):
        if isinstance(module, LoraLayer) and adapter_name in module.adapters:
            return module.adapters[adapter_name].form
    return None


def adapter_state_dict(model: nn.Module, adapter_name: str, config: LoraConfig | None = None,
                       save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` writes for one adapter, under PEFT's keys.

    The adapter's form may add tensors (VeRA's shared projections `base_model.vera_A/B`) or reshape the
    layout (AdaLoRA keeps only the singular triplets its `rank_pattern` kept, as PEFT does).
    `save_embedding_layers` as in PEFT: "auto" means True when `target_modules` names an embedding layer
    (`embed_tokens` / `lm_head`); then the base embedding weights travel in the file too."""
    bias = config.bias if config is not None else "none"
    params = _adapter_parameters(model, adapter_name)
    if bias == "all":
        params.update({f"{KEY_PREFIX}{k}": p for k, p in model.named_parameters() if k.endswith(".bias")
                       and ".lora_" not in k})
    elif bias == "lora_only":
        for name, module in adapter_layers(model):
            if isinstance(module, LoraLayer) and getattr(module.base_layer, "bias", None) is not None:
                params[f"{KEY_PREFIX}{name}.base_layer.bias"] = module.base_layer.bias
    if _saves_embedding_layers(model, config, save_embedding_layers):
        params.update(_embedding_layer_weights(model, _embedding_targeted(model, config)))
    state = {k: p.detach() for k, p in params.items()}
    form = adapter_form(model, adapter_name)
    if form is not None:
        state.update(form.saved_tensors())
        state = form.to_file(state, KEY_PREFIX)
    return state


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's names for "an embedding layer is targeted"


def _embedding_targeted(model: nn.Module, config) -> bool:
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str) and targets != "all-linear":
        names = (n for n, _ in model.named_modules() if re.match(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$", n))
        return any(re.fullmatch(targets, n) for n in names)
    return isinstance(targets, list) and any(name in targets for name in EMBEDDING_LAYER_NAMES)


def _saves_embedding_layers(model: nn.Module, config, save_embedding_layers: bool | str) -> bool:
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    if _embedding_targeted(model, config) and getattr(config, "trainable_token_indices", None) is None:
        warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.")
        return True
    return False


def _embedding_layer_weights(model: nn.Module, targeted: bool) -> dict[str, torch.Tensor]:
    """The base weights of the input / output embeddings, under PEFT's keys (a LoRA-wrapped embedding's
    weight is `<name>.base_layer.weight`); when an embedding is targeted, only wrapped ones are saved."""
    if not hasattr(model, "get_input_embeddings"):
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.")
        return {}
    wanted = {model.get_input_embeddings(), model.get_output_embeddings()}
    out = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(module, LoraLayer) and (module in wanted or base in wanted):
            out[f"{KEY_PREFIX}{name}.base_layer.weight"] = base.weight
        elif module in wanted and not targeted and not isinstance(module, LoraLayer):
            out.update({f"{KEY_PREFIX}{name}.{k}": p for k, p in module.named_parameters()})
    return out


def write_adapter(directory: str, config: LoraConfig, state_dict: dict[str, torch.Tensor],
                  safe_serialization: bool = True) -> None:
    """Write config + weights into `directory`. A new directory appears whole or not at all (built aside,
    renamed into place); into an existing one (which may hold other files) each file is replaced whole.
    `safe_serialization=False` writes PEFT's pickle file `adapter_model.bin` instead of safetensors."""
    if not os.path.isdir(directory):
        with atomic_path(directory, directory=True) as tmp:
            write_adapter(tmp, config, state_dict, safe_serialization)
        return
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(os.path.join(directory, WEIGHTS_NAME if safe_serialization else PICKLE_WEIGHTS_NAME)) as tmp:
        if safe_serialization:
            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
    with atomic_path(os.path.join(directory, CONFIG_NAME)) as tmp:
        with open(tmp, "w") as f:
            json.dump(config.to_dict(), f, indent=2, sort_keys=True)


def read_adapter(directory: str, allow_pickle: bool = False) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory (ours or PEFT's). Errors say which file is missing or corrupt."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory {directory!s} does not exist")
    config = read_config(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    pickle_path = os.path.join(directory, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(path):
        try:
            return config, load_file(path)
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise ValueError(f"{path} is not a valid safetensors file ({e}); re-save or re-download it") from None
    if os.path.isfile(pickle_path):
        return config, read_pickle_weights(pickle_path, allow_pickle)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")


def read_pickle_weights(path: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """PEFT's `adapter_model.bin`, read by torch's restricted unpickler (tensors and plain containers: no code
    runs), as PEFT reads it. A file that needs full pickle loads only with `allow_pickle=True`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise ValueError(f"{path} holds more than tensors ({str(e).splitlines()[0]}); full pickle can run code "
                             "on load: pass allow_pickle=True only if you trust it, or convert it to safetensors"
                             ) from None
    return torch.load(path, map_location="cpu", weights_only=False)


def load_adapter_weights(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor],
                         source: str = "adapter") -> None:
    """Copy file tensors into adapter `adapter_name`'s parameters, checking every key and shape."""
    targets = _adapter_parameters(model, adapter_name)
    base_params = dict(model.named_parameters(remove_duplicate=False))  # a tied head's weight under its name too
    state_dict = convert_old_expert_weights(model, dict(state_dict), KEY_PREFIX)  # transformers-4 MoE files, as PEFT
    form = adapter_form(model, adapter_name)
    if form is not None:
        form.load_saved_tensors({k: state_dict.pop(k) for k in form.saved_keys() if k in state_dict}, source)
    unexpected = []
    for key, tensor in state_dict.items():
        param = targets.get(key)
        if param is None and key.startswith(KEY_PREFIX):
            param = base_params.get(key[len(KEY_PREFIX):])  # biases / resized embeddings saved by PEFT
        if param is None:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(param.shape):
            module = key[len(KEY_PREFIX):].rsplit(".", 2)[0] if key.startswith(KEY_PREFIX) else key
            raise ValueError(f"{source}: tensor {key} has shape {tuple(tensor.shape)} but module {module!r} of "
                             f"this model expects {tuple(param.shape)}; was the adapter trained on another model?")
        with torch.no_grad():
            if param.is_meta:  # a placeholder (inject_adapter_in_model(low_cpu_mem_usage=True)) takes the tensor
                torch.utils.swap_tensors(param, nn.Parameter(tensor.to(param.dtype), param.requires_grad))
            else:
                param.copy_(tensor)
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} tensors match no module of this model, e.g. "
                         f"{unexpected[:3]}; was the adapter trained on another model?")
    missing = sorted(set(targets) - set(state_dict))
    if missing:
        raise ValueError(f"{source}: missing {len(missing)} adapter tensors, e.g. {missing[:3]}; "
                         "the file is incomplete or its config does not match its weights")


def converted_to_plain_lora(config: LoraConfig, state, initial_adapter_dir: str):
    """PiSSA/OLoRA -> LoRA on the original base: rank and alpha double (alpha·sqrt2 under rsLoRA), same scaling."""
    if type(config) is not LoraConfig or config.use_dora:
        raise ValueError("path_initial_model_for_weight_conversion converts PiSSA/OLoRA LoRA adapters only")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         "when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True` (the "
                         "doubled-rank conversion cannot keep each layer's scaling)")
    _, initial = read_adapter(initial_adapter_dir)
    missing = sorted(set(state) - set(initial))
    if missing:
        raise ValueError(f"{initial_adapter_dir} does not hold the initial factors of this adapter "
                         f"(missing e.g. {missing[:2]})")
    factor = 2 ** 0.5 if config.use_rslora else 2
    converted = dataclasses.replace(
        config, init_lora_weights=True, r=2 * config.r, lora_alpha=config.lora_alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})
    return converted, to_plain_lora(state, initial)
