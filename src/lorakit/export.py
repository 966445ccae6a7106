"""Export for deployment: merged transformers checkpoints, and GGUF files for llama.cpp.

- `export_hf`: merge the adapter into the base and write a standard transformers directory.
- `export_gguf_adapter`: a llama.cpp LoRA adapter (general.type=adapter, adapter.type=lora,
  adapter.lora.alpha, tensors `blk.N.<name>.weight.lora_a/.lora_b`).
- `export_gguf`: the merged model as a GGUF file (f32/f16/bf16/q8_0), tokenizer and chat template
  included, loadable by llama.cpp and by transformers' GGUF loader.
The GGUF writers and the per-family conventions (Llama, Mistral, Qwen2/3, Gemma 1/2, Phi-3) live in
`gguf_export`; they are re-exported here.
All writes go to a temp file/dir first and are renamed into place; existing outputs need force=True.
"""

from __future__ import annotations

import torch

from .gguf_export import GGUF_FAMILIES, GGUF_TYPES, export_gguf, export_gguf_adapter, permute_rotary
from .utils import atomic_path, check_target

__all__ = ["check_target", "export_hf", "export_gguf", "export_gguf_adapter", "permute_rotary", "GGUF_FAMILIES",
           "GGUF_TYPES"]


def export_hf(peft_model, tokenizer, out_dir: str, dtype: torch.dtype | None = None, force: bool = False) -> str:
    """Merge and write `out_dir` as a transformers model directory (safetensors, config, tokenizer)."""
    check_target(out_dir, force, "model_dir")
    merged = peft_model.merge_and_unload()
    if dtype is not None:
        merged.to(dtype)
    with atomic_path(out_dir, directory=True) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir

