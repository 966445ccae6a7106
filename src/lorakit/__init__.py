"""lorakit: LoRA fine-tuning and serving, with PEFT's API and file format."""

from . import moved_modules
from .adapters import (
                       LoraModel,
                       PeftConfig,
                       PeftModel,
                       PeftModelForCausalLM,
                       PeftModelForFeatureExtraction,
                       PeftModelForQuestionAnswering,
                       PeftModelForSeq2SeqLM,
                       PeftModelForSequenceClassification,
                       PeftModelForTokenClassification,
                       PeftType,
                       TaskType,
                       get_layer_status,
                       get_model_status,
                       get_peft_model,
                       get_peft_model_state_dict,
                       inject_adapter_in_model,
                       prepare_model_for_kbit_training,
                       set_peft_model_state_dict,
)
from .layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear
from .models import load_model, load_tokenizer
from .variants import AdaLoraConfig, LoraConfig, VeraConfig

moved_modules.install()  # old module paths (lorakit.train_config, lorakit.model, ...) for one release
__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig", "VeraConfig",
    "LoraConfig", "LoraModel", "PeftModel", "get_peft_model", "LoraLayer", "LoraLinear", "LoraEmbedding",
    "LoraConv", "load_model", "load_tokenizer", "__version__",
    "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "PeftConfig", "PeftType", "TaskType", "get_peft_model_state_dict", "inject_adapter_in_model",
    "prepare_model_for_kbit_training", "set_peft_model_state_dict", "get_layer_status", "get_model_status",
]
