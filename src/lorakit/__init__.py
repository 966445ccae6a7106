"""lorakit: LoRA fine-tuning and serving, with PEFT's API and file format."""

from .config import LoraConfig
from .layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear
from .model import LoraModel, PeftModel, get_peft_model
from .model_loading import load_model, load_tokenizer
from .variants.adalora import AdaLoraConfig
from .variants.vera import VeraConfig

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig", "VeraConfig",
    "LoraConfig", "LoraModel", "PeftModel", "get_peft_model", "LoraLayer", "LoraLinear", "LoraEmbedding",
    "LoraConv", "load_model", "load_tokenizer", "__version__",
]
