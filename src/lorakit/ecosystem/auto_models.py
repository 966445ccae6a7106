"""PEFT's AutoPeftModel classes: load the base model an adapter directory names, then the adapter on it."""

from __future__ import annotations

import transformers

from ..adapters import PeftModel
from ..variants.registry import read_config


class AutoPeftModel:
    """`AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`: base from the config's base_model_name_or_path."""

    auto_class = transformers.AutoModel

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, adapter_name: str = "default",
                        is_trainable: bool = False, config=None, **kwargs):
        config = config or read_config(pretrained_model_name_or_path)
        if not config.base_model_name_or_path:
            raise ValueError(f"{pretrained_model_name_or_path}/adapter_config.json names no base_model_name_or_path: "
                             "load the base model yourself and use PeftModel.from_pretrained(base, adapter_dir)")
        base = cls.auto_class.from_pretrained(config.base_model_name_or_path, **kwargs)
        return PeftModel.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                         is_trainable=is_trainable)


class AutoPeftModelForCausalLM(AutoPeftModel):
    auto_class = transformers.AutoModelForCausalLM
