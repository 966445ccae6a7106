"""PEFT's module-level API on lorakit's objects: enums, PeftConfig.from_pretrained, state-dict helpers,
in-place injection and k-bit preparation. Same names, signatures and behaviour as peft 0.21."""

from __future__ import annotations

import abc
import os

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ..quant.nf4 import NF4Linear
from ..variants.lora_config import LoraConfig
from ..variants.registry import read_config
from . import peft_format
from .inject import adapter_layers, inject_adapter


class PeftConfig(abc.ABC):
    """Every lorakit config is a PeftConfig; `PeftConfig.from_pretrained(dir)` returns the config class the
    file's `peft_type` names."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **_):
        """The config saved in a directory, as the class its `peft_type` names (LoraConfig, VeraConfig, AdaLoraConfig)."""
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        return read_config(directory)


PeftConfig.register(LoraConfig)


def _root(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def get_peft_model_state_dict(model: nn.Module, state_dict: dict | None = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False, save_embedding_layers: str | bool = "auto"):
    """The adapter's tensors under the keys PEFT writes to adapter_model.safetensors (no adapter name)."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    state = peft_format.adapter_state_dict(_root(model), adapter_name, config, save_embedding_layers)
    if hasattr(model, "get_base_model"):
        return state
    # A bare model with injected layers (inject_adapter_in_model, transformers' add_adapter): PEFT's keys are that
    # model's own state_dict names, without the PeftModel's `base_model.model.` prefix.
    prefix = peft_format.KEY_PREFIX
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict, adapter_name: str = "default",
                              ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False):
    """Load PEFT-keyed adapter tensors into adapter `adapter_name`. Returns the load result (missing /
    unexpected keys); a shape that does not fit raises ValueError, as PEFT raises on a size mismatch."""
    peft_format.load_adapter_weights(_root(model), adapter_name, peft_model_state_dict, source="state dict")
    return _IncompatibleKeys([], [])


def inject_adapter_in_model(peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: dict | None = None) -> nn.Module:
    """Add the adapter's layers to `model` in place, without a wrapper (PEFT's low-level API). Only the new
    adapter's parameters are trainable. Returns `model`. `low_cpu_mem_usage=True` leaves the new adapter's
    tensors as uninitialised placeholders on the meta device, as PEFT does, for `state_dict` (or a later
    set_peft_model_state_dict) to fill."""
    inject_adapter(model, peft_config, adapter_name)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapter_layers(model):
        layer.set_active_adapters([adapter_name])
        for p in layer.adapter_parameters(adapter_name).values():
            p.requires_grad_(not peft_config.inference_mode)
            if low_cpu_mem_usage:
                torch.utils.swap_tensors(p, nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad))
    if state_dict is not None:
        peft_format.load_adapter_weights(model, adapter_name, state_dict, source="state_dict")
    # As PEFT: the model carries its adapters' configs (transformers' adapter API reads model.peft_config).
    configs = model.__dict__.get("peft_config")
    model.peft_config = {**(configs if isinstance(configs, dict) else {}), adapter_name: peft_config}
    return model


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None, auto_clear_cache: bool = True):
    """PEFT's preparation before QLoRA: freeze every parameter, upcast fp16/bf16 parameters (norms,
    embeddings, head) to fp32, and on a 4-bit model turn on gradient checkpointing with input gradients."""
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.parameters():  # NF4 weights are buffers, not parameters: they stay 4-bit
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.to(torch.float32)
    quantized = any(isinstance(m, NF4Linear) for m in model.modules()) or getattr(model, "is_loaded_in_4bit", False)
    if quantized and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
