"""A model with adapters, PEFT's way: `LoraModel` (= `PeftModel`) and its lifecycle (model.py), injection into a
base model (inject.py: targets, MoE parameters, tied weights), PEFT's file format (peft_format.py) and saving /
loading as model methods (files.py), merging and adapter arithmetic (merge.py, arithmetic.py), PEFT's task
classes (task_models.py), module-level helpers (peft_api.py) and status reports (status.py)."""

from .base_state import get_base_model_state_dict, set_base_model_state_dict
from .model import BASE_ROW, LoraModel, PeftModel
from ..variants.peft_types import PeftType, TaskType
from .peft_api import (PeftConfig, get_peft_model_state_dict, inject_adapter_in_model, prepare_model_for_kbit_training,
                       set_peft_model_state_dict)
from .status import get_layer_status, get_model_status
from .task_models import (PeftModelForCausalLM, PeftModelForFeatureExtraction, PeftModelForQuestionAnswering,
                          PeftModelForSeq2SeqLM, PeftModelForSequenceClassification, PeftModelForTokenClassification,
                          get_peft_model)
from .tuner import LoraTuner

__all__ = ["BASE_ROW", "LoraModel", "LoraTuner", "PeftConfig", "PeftModel", "PeftModelForCausalLM",
           "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
           "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "PeftType", "TaskType",
           "get_base_model_state_dict", "get_layer_status", "get_model_status", "get_peft_model", "get_peft_model_state_dict",
           "inject_adapter_in_model", "prepare_model_for_kbit_training", "set_base_model_state_dict",
           "set_peft_model_state_dict"]
