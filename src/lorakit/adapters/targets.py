"""Which modules and parameters a config targets, matched as PEFT matches them (so a config means the same thing in
both libraries):
  - target_modules as a string: full-match regex against the module's dotted name;
  - as a list: exact name, or a dotted-suffix match (`q_proj` matches `...self_attn.q_proj`);
  - "all-linear": every Linear / Conv1D except the output head;
  - exclude_modules: same rules, removes matches; modules_to_save are never adapted;
  - layers_to_transform (+ layers_pattern): keep only modules inside the listed layer indices.
"""

from __future__ import annotations

import difflib
import re
import warnings

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..layers import LoraLayer, lora_layer_class
from ..layers.modules_to_save import ModulesToSaveWrapper
from ..layers.parameter import LoraParameter
from ..layers.trainable_tokens import TrainableTokensWrapper
from ..quant.nf4 import NF4Linear
from ..variants.lora_config import LoraConfig


ALL_LINEAR = "all-linear"


def _suffix_match(key: str, names) -> bool:
    return key in names or any(key.endswith(f".{n}") for n in names)


def _matches(spec: str | list[str], key: str) -> bool:
    return bool(re.fullmatch(spec, key)) if isinstance(spec, str) else _suffix_match(key, spec)


def layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    """Index of the first numbered block in `key` (`model.layers.3.mlp` -> 3), PEFT's rule."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def _in_layers(key: str, config: LoraConfig) -> bool:
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    idx = layer_index(key, config.layers_pattern)
    if idx is None:
        return False
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def all_linear_names(model: nn.Module, task_type: str | None = None) -> list[str]:
    """Every Linear/Conv1D module name except the output head (lm_head or a classifier head)."""
    linear_types = (nn.Linear, NF4Linear, Conv1D)
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        heads.add(id(out_emb))
    elif task_type == "SEQ_CLS":
        heads.update(id(getattr(model, n)) for n in TASK_HEAD_NAMES["SEQ_CLS"] if getattr(model, n, None) is not None)
    return [name for name, module in _plain_modules(model)
            if isinstance(base_of(module), linear_types) and id(module) not in heads and id(base_of(module)) not in heads]


WRAPPERS = (LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper)  # modules lorakit puts in a model


def _plain_modules(model: nn.Module):
    """named_modules(), without the insides of LoRA layers and the other wrappers."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skip):
            continue
        if isinstance(module, WRAPPERS):
            skip.append(name + ".")
        yield name, module


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules `config` adapts. Raises ValueError for names that match nothing."""
    modules = dict(_plain_modules(model))
    spec = config.target_modules
    if spec in (None, [], "") and getattr(config, "target_parameters", None):
        return []  # parameters only (PEFT)
    if spec is None:
        raise ValueError("target_modules is not set: give module names (e.g. ['q_proj', 'v_proj']), "
                         "a regex string, or 'all-linear'")
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        spec = all_linear_names(model, config.task_type)
    try:
        _check_names_exist(spec, modules)
    except ValueError as e:
        if not getattr(config, "target_parameters", None) or any(_matches(spec, n) for n in modules):
            raise
        shown = spec if isinstance(spec, str) else set(spec)
        warnings.warn(f"target_modules={shown} were set but no module was matched. ({e}; the adapter goes on the "
                      "target_parameters only)", RuntimeWarning)
        return []
    saved = config.modules_to_save or []
    targets = []
    for name, module in modules.items():
        if not _matches(spec, name) or not _in_layers(name, config):
            continue
        if config.exclude_modules and _matches(config.exclude_modules, name):
            continue
        if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in saved) or isinstance(module, ModulesToSaveWrapper):
            continue
        if not isinstance(module, LoraLayer) and lora_layer_class(module) is None:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) matched target_modules but LoRA supports only "
                "Linear, Conv1D, Embedding, Conv1d/2d/3d and MultiheadAttention layers; narrow target_modules"
            )
        targets.append(name)
    if not targets and not getattr(config, "target_parameters", None):
        raise ValueError(f"target_modules {config.target_modules!r} matched no adaptable module "
                         f"(after exclude_modules / layers_to_transform)")
    return targets


def find_parameter_targets(model: nn.Module, config: LoraConfig, module_targets: list[str]) -> list[tuple[str, str]]:
    """(module name, parameter name) per parameter `config.target_parameters` names (PEFT's rule: the full
    dotted name, or a dotted suffix of it), in the order PEFT wraps them: modules in model order, a module's
    parameters in registration order. Raises ValueError when nothing matches or a module is also a module target."""
    wanted = getattr(config, "target_parameters", None)
    if not wanted:
        return []
    found = []
    for name, module in _plain_modules(model):
        if isinstance(module, LoraParameter):
            module = module.target_module()
        elif isinstance(module, WRAPPERS):
            continue
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{name}.{param_name}"
            if _suffix_match(key, wanted):
                if name in module_targets:
                    raise ValueError(f"Trying to wrap an `nn.Parameter` of layer {name!r} of type "
                                     f"{type(module).__name__}, which is not a valid target. Parameter {key!r} is in "
                                     "target_parameters but its module is also a LoRA "
                                     "target (target_modules); target one or the other (target_modules=[] for "
                                     "parameters only)")
                found.append((name, param_name))
    if not found:
        names = [f"{n}.{p}" for n, m in _plain_modules(model) for p, _ in m.named_parameters(recurse=False)
                 if p != "weight" and p != "bias"]
        detail = (f"bare parameters in this model look like "
                  f"{names[:3] or 'nothing (every parameter is a weight or bias)'}")
        if module_targets:  # PEFT: the module targets still apply
            warnings.warn(f"target_parameters={wanted} were set but no parameter was matched. ({detail}; the adapter "
                          "goes on the target_modules only)", RuntimeWarning)
            return []
        raise ValueError(f"No `target_modules` passed but also no `target_parameters` found. Please check the values "
                         f"for these arguments. (target_parameters={wanted} matched no parameter; {detail})")
    return found


def _check_names_exist(spec: str | list[str], modules: dict[str, nn.Module]) -> None:
    """Every listed target name must match some module; suggest close names otherwise."""
    names = list(modules)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    if isinstance(spec, str):
        if not any(re.fullmatch(spec, n) for n in names):
            raise ValueError(f"target_modules regex {spec!r} matches no module name; module names look like "
                             f"{names[:3]} and end in one of {suffixes[:20]}")
        return
    for target in spec:
        if not any(_suffix_match(n, [target]) for n in names):
            close = difflib.get_close_matches(target, suffixes + names, n=5, cutoff=0.5)
            hint = f"closest module names: {close}" if close else f"module names end in one of {suffixes[:20]}"
            raise ValueError(f"target module {target!r} not found in the model; {hint}")


def trainable_token_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, list[int]]]:
    """(module name, token ids) per module whose rows `config.trainable_token_indices` trains: a list means
    the input embedding (else `embed_tokens`), a dict maps module names (dotted suffixes) to ids, as in PEFT."""
    spec = getattr(config, "trainable_token_indices", None)
    if spec is None:
        return []
    modules = list(_plain_modules(model))
    if isinstance(spec, dict):
        found = []
        for key, indices in spec.items():
            names = [n for n, _ in modules if _suffix_match(n, [key])]
            if not names:
                raise ValueError(f"trainable_token_indices names module {key!r}, which is not in the model")
            found += [(n, list(indices)) for n in names]
        return found
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    names = [n for n, m in modules if m is embedding] or [n for n, _ in modules if _suffix_match(n, ["embed_tokens"])]
    if not names:
        raise ValueError("trainable_token_indices is a list but the model has no input embedding layer; "
                         "give a dict {module name: [token ids]}")
    return [(names[0], list(spec))]


TASK_HEAD_NAMES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                   "QUESTION_ANS": ("qa_outputs",)}


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    wanted = config.modules_to_save or []
    found = [name for name, _ in _plain_modules(model) if _suffix_match(name, wanted)]
    optional = TASK_HEAD_NAMES.get(config.task_type, ())  # PEFT lists every usual head name; a model has one
    for target in wanted:
        if target not in optional and not any(_suffix_match(n, [target]) for n in found):
            raise ValueError(f"modules_to_save entry {target!r} not found in the model")
    # Wrappers themselves are skipped by _plain_modules' descent but listed; keep them.
    return found


def base_of(module: nn.Module) -> nn.Module:
    """The layer a LoRA wrapper wraps (a plain module is its own base)."""
    return module.base_layer if isinstance(module, LoraLayer) else module
