"""What `import peft` gives after `install_as_peft()`: PEFT's module tree, each name bound to lorakit's own
object (nothing of the real peft is imported). The table lists the modules and names that trl, transformers and
accelerate import (grep of trl 1.16, transformers 5.25, accelerate 1.16) plus PEFT's public names a LoRA user
writes. Names are resolved on first use, so `import peft` costs what `import lorakit` costs.

A PEFT method lorakit does not implement (prefix tuning, LoHa, IA3, ...) is a class: `isinstance` checks on it
answer False, and building one raises NotImplementedError naming the method. A `peft.*` module outside the table
raises ModuleNotFoundError saying lorakit stands in for peft and which modules it provides.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# `peft.__version__` and importlib.metadata.version("peft") while lorakit stands in: the lowest release the
# installed transformers (5.25: MIN_PEFT_VERSION 0.22.0 for its adapter API) and trl accept. lorakit's file format
# and API follow PEFT 0.21.2 (the dev dependency tests compare with), which 0.22 keeps.
PEFT_STAND_IN_VERSION = "0.22.0"

_ADAPTERS = "lorakit.adapters"
_TOP = {name: f"{_ADAPTERS}:{name}" for name in [
    "PeftConfig", "PeftModel", "PeftType", "TaskType", "get_peft_model", "inject_adapter_in_model",
    "get_peft_model_state_dict", "set_peft_model_state_dict", "prepare_model_for_kbit_training",
    "PeftModelForCausalLM", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification", "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction",
    "get_layer_status", "get_model_status"]}
_TOP.update({"LoraConfig": "lorakit.variants:LoraConfig", "AdaLoraConfig": "lorakit.variants:AdaLoraConfig",
             "VeraConfig": "lorakit.variants:VeraConfig", "PeftMixedModel": f"{_ADAPTERS}:PeftModel",
             "LoraModel": f"{_ADAPTERS}:LoraTuner",
             "AutoPeftModel": "lorakit.ecosystem.auto_models:AutoPeftModel",
             "AutoPeftModelForCausalLM": "lorakit.ecosystem.auto_models:AutoPeftModelForCausalLM",
             "load_peft_weights": "lorakit.ecosystem.peft_functions:load_peft_weights"})
_WRAPPERS = {"ModulesToSaveWrapper": "lorakit.layers:ModulesToSaveWrapper",
             "TrainableTokensWrapper": "lorakit.layers:TrainableTokensWrapper",
             "AuxiliaryTrainingWrapper": "lorakit.ecosystem.peft_functions:AuxiliaryTrainingWrapper"}
_STATE = {n: _TOP[n] for n in ("get_peft_model_state_dict", "set_peft_model_state_dict", "PeftType", "TaskType")}

# PEFT's methods that lorakit does not implement (PEFT's config class name -> what it is)
UNSUPPORTED = {
    "PrefixTuningConfig": "prefix tuning", "PromptLearningConfig": "prompt learning",
    "PromptTuningConfig": "prompt tuning", "PromptEncoderConfig": "P-tuning", "MultitaskPromptTuningConfig":
    "multitask prompt tuning", "CPTConfig": "context-aware prompt tuning", "LoHaConfig": "LoHa",
    "LoKrConfig": "LoKr", "IA3Config": "IA3", "OFTConfig": "OFT", "BOFTConfig": "BOFT", "LNTuningConfig":
    "LayerNorm tuning", "XLoraConfig": "X-LoRA", "HRAConfig": "HRA", "FourierFTConfig": "FourierFT",
    "BoneConfig": "Bone", "PolyConfig": "Poly", "VBLoRAConfig": "VB-LoRA", "RandLoraConfig": "RandLoRA",
    "C3AConfig": "C3A", "ShiraConfig": "SHiRA", "MissConfig": "MiSS", "TrainableTokensConfig":
    "the TrainableTokens tuner (lorakit trains token rows through LoraConfig.trainable_token_indices)"}

PEFT_MODULES: dict[str, dict[str, str]] = {
    "peft": {**_TOP, **{n: f"lorakit.ecosystem.peft_namespace:{n}" for n in UNSUPPORTED}},
    "peft.tuners": {"LoraConfig": _TOP["LoraConfig"], "LoraModel": _TOP["LoraModel"]},
    "peft.tuners.tuners_utils": {"BaseTunerLayer": "lorakit.layers:LoraLayer", "BaseTuner": _TOP["LoraModel"]},
    "peft.tuners.lora": {"LoraLayer": "lorakit.layers:LoraLayer", "LoraConfig": _TOP["LoraConfig"],
                         "LoraModel": _TOP["LoraModel"], "Linear": "lorakit.layers:LoraLinear",
                         "Embedding": "lorakit.layers:LoraEmbedding"},
    "peft.utils": {**_WRAPPERS, **_STATE},
    "peft.utils.other": {**_WRAPPERS, "fsdp_auto_wrap_policy": "lorakit.ecosystem.peft_functions:fsdp_auto_wrap_policy"},
    "peft.utils.save_and_load": {**_STATE, "load_peft_weights": _TOP["load_peft_weights"]},
    "peft.utils.transformers_weight_conversion": {
        "build_peft_weight_mapping": "lorakit.ecosystem.weight_mapping:build_peft_weight_mapping"},
    "peft.functional": {"delete_adapter": "lorakit.ecosystem.peft_functions:delete_adapter",
                        "inject_adapter_in_model": _TOP["inject_adapter_in_model"], **_STATE},
    "peft.mapping": {"get_peft_model": _TOP["get_peft_model"], "inject_adapter_in_model": _TOP["inject_adapter_in_model"]},
    "peft.peft_model": {n: _TOP[n] for n in _TOP if n.startswith("PeftModel")},
    "peft.config": {"PeftConfig": _TOP["PeftConfig"]},
}


def _unsupported(name: str) -> type:
    def refuse(self, *args, **kwargs):
        raise NotImplementedError(
            f"peft.{name} ({UNSUPPORTED[name]}) is not implemented by lorakit, which stands in for peft here "
            "(lorakit.install_as_peft / LORAKIT_AS_PEFT=1). lorakit implements LoRA and its variants: LoraConfig "
            "(use_dora, use_rslora, PiSSA/OLoRA init, rank_pattern, ...), AdaLoraConfig, VeraConfig")
    return type(name, (), {"__init__": refuse, "__module__": "peft", "__doc__": f"Not in lorakit: {UNSUPPORTED[name]}."})


globals().update({name: _unsupported(name) for name in UNSUPPORTED})


def resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def build_module(fullname: str) -> ModuleType:
    """The stand-in module `fullname` (a key of PEFT_MODULES): its names resolve lazily to lorakit's objects."""
    names = PEFT_MODULES[fullname]
    module = ModuleType(fullname, f"lorakit's stand-in for {fullname} (lorakit.install_as_peft)")
    module.__path__ = []  # a package: its submodules come through the same finder
    module.__lorakit__ = True
    module.__all__ = sorted(names)
    if fullname == "peft":
        module.__version__ = PEFT_STAND_IN_VERSION

    def __getattr__(name: str):
        if name in names:
            value = resolve(names[name])
            setattr(module, name, value)
            return value
        child = f"{fullname}.{name}"
        if child in PEFT_MODULES:
            return importlib.import_module(child)
        raise AttributeError(f"{fullname}.{name} is not provided by lorakit, which stands in for peft here "
                             f"(lorakit.install_as_peft); {fullname} provides: {', '.join(sorted(names))}")

    module.__getattr__ = __getattr__
    return module


def missing_module(fullname: str) -> ModuleType:
    raise ModuleNotFoundError(
        f"No module named {fullname!r}: lorakit stands in for peft here (lorakit.install_as_peft / LORAKIT_AS_PEFT=1) "
        f"and provides {', '.join(sorted(PEFT_MODULES))}", name=fullname)
