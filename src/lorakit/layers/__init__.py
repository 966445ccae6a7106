"""LoRA layers: each wraps (never subclasses) a base layer and adds named adapters.

A layer does the geometry — how an adapter's pair (A, B) meets an input and the base weight:
  Linear     A: (r, d_in)            B: (d_out, r)          out = B A x
  Embedding  A: (r, num_embeddings)  B: (embedding_dim, r)  out = B A[:, ids]
  ConvNd     A: conv, base kernel    B: 1x1 conv            out = B * (A * x)
The adapter's form (lorakit/variants/, through the interface in form.py) decides which parameters it has, how they start and which factors
they stand for; the layer keeps one `Adapter` record per name and asks the form. Parameter names
are PEFT's (`base_layer`, `lora_A`, `lora_B`, `lora_embedding_A`, ...) so a state dict maps one to
one onto PEFT's adapter files. Merging is an explicit, idempotent call.

Also here, because only layers use them: mixed-adapter batches (mixed_batch.py), trainable token rows
(trainable_tokens.py) and PEFT's modules_to_save copies (modules_to_save.py). Layers import nothing from
adapters/, variants/, train/ or serve/.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..quant.nf4 import NF4Linear
from .attention import LoraMultiheadAttention
from .base import LoraLayer
from .conv import LoraConv
from .embedding import LoraEmbedding
from .form import Adapter, AdapterForm
from .linear import LoraLinear
from .modules_to_save import ModulesToSaveWrapper
from .trainable_tokens import TrainableTokensWrapper

# Base layer type -> LoRA wrapper (the first match wins).
LAYER_TYPES: list[tuple[type, type]] = [
    (NF4Linear, LoraLinear), (nn.Linear, LoraLinear), (Conv1D, LoraLinear), (nn.Embedding, LoraEmbedding),
    (nn.Conv1d, LoraConv), (nn.Conv2d, LoraConv), (nn.Conv3d, LoraConv), (nn.MultiheadAttention, LoraMultiheadAttention)]


def lora_layer_class(module: nn.Module) -> type | None:
    for base_type, lora_type in LAYER_TYPES:
        if isinstance(module, base_type):
            return lora_type
    return None


__all__ = ["LAYER_TYPES", "Adapter", "AdapterForm", "LoraConv", "LoraEmbedding", "LoraLayer", "LoraLinear",
           "LoraMultiheadAttention", "ModulesToSaveWrapper", "TrainableTokensWrapper", "lora_layer_class"]
