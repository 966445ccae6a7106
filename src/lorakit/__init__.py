"""lorakit: LoRA fine-tuning and serving, with PEFT's API and file format."""

from .config import LoraConfig
from .layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear
from .model import LoraModel, PeftModel
from .model_loading import load_model, load_tokenizer
from .peft_api import (PeftConfig, PeftType, TaskType, get_peft_model_state_dict, inject_adapter_in_model,
                       prepare_model_for_kbit_training, set_peft_model_state_dict)
from .status import get_layer_status, get_model_status
from .task_models import (PeftModelForCausalLM, PeftModelForFeatureExtraction, PeftModelForQuestionAnswering,
                          PeftModelForSeq2SeqLM, PeftModelForSequenceClassification, PeftModelForTokenClassification,
                          get_peft_model)
from .variants.adalora import AdaLoraConfig
from .variants.vera import VeraConfig

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
