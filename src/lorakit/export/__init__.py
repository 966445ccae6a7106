"""Export for deployment: a merged transformers directory (merged.py) and GGUF files for llama.cpp (gguf.py:
the merged model and LoRA adapters, per-family conventions; gguf_tokenizer.py: the tokenizer they carry).
All writes go to a temp file/dir first and are renamed into place; existing outputs need force=True."""

from ..utils import check_target
from .gguf import GGUF_FAMILIES, GGUF_TYPES, export_gguf, export_gguf_adapter, permute_rotary
from .merged import export_hf

__all__ = ["GGUF_FAMILIES", "GGUF_TYPES", "check_target", "export_gguf", "export_gguf_adapter", "export_hf",
           "permute_rotary"]
