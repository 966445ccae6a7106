"""Adapter forms, one file each with its config: plain LoRA (lora.py, its config lora_config.py, with the DoRA,
rsLoRA and PiSSA / OLoRA options: dora.py, svd_init.py), VeRA (vera.py), AdaLoRA (adalora.py; its rank budget
adalora_budget.py); the registry of configs by PEFT's `peft_type` (registry.py); PEFT's default targets per
model type (default_targets.py); LoRA+ learning rates (loraplus.py).

A form answers, through the interface in lorakit/layers/form.py, how an adapter's parameters are created,
initialised and turned into an update; a new form is a new file here plus one line in registry.py."""

from .adalora import AdaLoraConfig
from .lora_config import LoraConfig
from .loraplus import create_loraplus_optimizer, loraplus_param_groups
from .registry import CONFIG_TYPES, config_class, config_from_dict, read_config
from .vera import VeraConfig

__all__ = ["AdaLoraConfig", "CONFIG_TYPES", "LoraConfig", "VeraConfig", "config_class", "config_from_dict",
           "create_loraplus_optimizer", "loraplus_param_groups", "read_config"]
