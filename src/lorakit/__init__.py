"""lorakit: LoRA fine-tuning and serving, with PEFT's API and file format.

The public names below load on first use (PEP 562), so `lorakit --help` and `import lorakit` do not pay for
torch and transformers until a name that needs them is touched; `from lorakit import LoraConfig` works as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from . import moved_modules
from .ecosystem import as_peft as _as_peft
from .ecosystem import guards as _guards

moved_modules.install()  # old module paths (lorakit.train_config, lorakit.model, ...) for one release
_as_peft.install_from_environment()  # LORAKIT_AS_PEFT=1: `import peft` resolves to lorakit
_guards.install_guards()  # transformers' Trainer saves lorakit adapters; TRL names install_as_peft() when needed

__version__ = "0.1.0"

# public name -> the subpackage that defines it
_PUBLIC = {
    **dict.fromkeys(["AdaLoraConfig", "LoraConfig", "VeraConfig"], "lorakit.variants"),
    **dict.fromkeys(["LoraConv", "LoraEmbedding", "LoraLayer", "LoraLinear"], "lorakit.layers"),
    **dict.fromkeys(["load_model", "load_tokenizer"], "lorakit.models"),
    "PeftWarning": "lorakit.utils",
    "install_as_peft": "lorakit.ecosystem.as_peft",
    **dict.fromkeys([
        "LoraModel", "PeftModel", "get_peft_model", "PeftModelForCausalLM", "PeftModelForFeatureExtraction",
        "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
        "PeftModelForTokenClassification", "PeftConfig", "PeftType", "TaskType", "get_peft_model_state_dict",
        "inject_adapter_in_model", "prepare_model_for_kbit_training", "set_peft_model_state_dict",
        "get_layer_status", "get_model_status", "get_base_model_state_dict", "set_base_model_state_dict"],
        "lorakit.adapters"),
}

__all__ = [*_PUBLIC, "__version__"]

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .adapters import (LoraModel,  # noqa: F401 (re-exported through __getattr__)
                           PeftConfig, PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction,
                           PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM, PeftModelForSequenceClassification,
                           PeftModelForTokenClassification, PeftType, TaskType, get_layer_status, get_model_status,
                           get_peft_model, get_peft_model_state_dict, inject_adapter_in_model,
                           prepare_model_for_kbit_training, set_peft_model_state_dict, get_base_model_state_dict,
                           set_base_model_state_dict)
    from .layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear  # noqa: F401
    from .models import load_model, load_tokenizer  # noqa: F401
    from .ecosystem.as_peft import install_as_peft  # noqa: F401
    from .utils import PeftWarning  # noqa: F401
    from .variants import AdaLoraConfig, LoraConfig, VeraConfig  # noqa: F401


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # `lorakit.train` without importing it first
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
