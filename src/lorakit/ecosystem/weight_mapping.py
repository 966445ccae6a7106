"""`build_peft_weight_mapping`: how transformers' `load_adapter` renames an adapter file's keys onto the model.

A file key `base_model.model.<module path>.lora_A.weight` becomes the parameter `<module path>.lora_A.<adapter>.weight`
(the same rule as peft 0.21 for the keys a LoRA file holds); the model's own key renamings apply after it.
A model whose loading fuses weights (transformers 5's MoE `gate_up_proj` converters) gets the renamings only:
lorakit places adapters on fused experts through its own targets (adapters/moe_targets.py), not through
transformers' converters."""

from __future__ import annotations

import re

from transformers.core_model_loading import WeightRenaming

from ..variants.lora_config import LoraConfig
from ..variants.registry import CONFIG_TYPES


def adapter_prefixes(peft_config) -> list[str]:
    """The name starts of the adapter's parameter containers ('lora_', VeRA's 'vera_lambda_'); every form's when
    the config does not say."""
    prefix = getattr(peft_config, "PREFIX", None)
    return [prefix] if prefix else sorted({getattr(c, "PREFIX", LoraConfig.PREFIX) for c in CONFIG_TYPES.values()})


def build_peft_weight_mapping(weight_conversions, adapter_name: str, peft_config=None) -> list:
    """transformers' weight transforms for loading adapter `adapter_name` (PEFT's function, same arguments)."""
    renamings = [WeightRenaming("base_model.model.model.", "model."), WeightRenaming("base_model.model.", "")]
    renamings += [WeightRenaming(source_patterns=rf"({re.escape(p)}[^\.]*)", target_patterns=rf"\1.{adapter_name}")
                  for p in adapter_prefixes(peft_config)]
    return renamings + [c for c in weight_conversions or [] if isinstance(c, WeightRenaming)]
