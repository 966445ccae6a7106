"""Every adapter form lorakit knows, by PEFT's `peft_type`.

A form is one file in variants/ (its config class, its layer form) and one line here. Plain LoRA's
options (DoRA, rsLoRA, PiSSA / OLoRA init) are options of LoraConfig, not forms of their own.
"""

from __future__ import annotations

import os
from typing import Any

from .adalora import AdaLoraConfig
from .lora_config import LoraConfig, read_config_file
from .vera import VeraConfig

CONFIG_TYPES: dict[str, type[LoraConfig]] = {c.PEFT_TYPE: c for c in (
    LoraConfig,
    VeraConfig,
    AdaLoraConfig,
)}


def config_class(peft_type: Any, source: str = "settings") -> type[LoraConfig]:
    if not isinstance(peft_type, str) or peft_type not in CONFIG_TYPES:
        raise ValueError(f"{source}: peft_type must be one of {sorted(CONFIG_TYPES)}, got {peft_type!r}")
    return CONFIG_TYPES[peft_type]


def config_from_dict(data: dict[str, Any]) -> LoraConfig:
    """A LoraConfig / VeraConfig / AdaLoraConfig from a dict of settings, chosen by its `peft_type` (default LORA)."""
    return config_class(data.get("peft_type", "LORA"))(**data)


def read_config(directory: str | os.PathLike) -> LoraConfig:
    """The adapter config saved in `directory`, as the class its `peft_type` names (unknown fields kept)."""
    data = read_config_file(directory)
    return config_class(data.get("peft_type", "LORA"), os.path.join(directory, "adapter_config.json")).from_dict(data)
