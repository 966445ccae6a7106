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

import os

import torch

from .utils import atomic_path

__all__ = ["check_target", "export_hf", "export_gguf", "export_gguf_adapter", "permute_rotary", "GGUF_FAMILIES",
           "GGUF_TYPES"]


HF_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                  "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def check_target(path: str, force: bool, kind: str) -> None:
    """Refuse to overwrite `path` unless `force`; with `force`, replace only an output of the same kind:
    a file for kind "file", a model directory (only model/tokenizer files, or empty) for kind "model_dir", a
    directory for kind "adapter_dir" (adapter files are replaced in it, other files kept).
    Anything else at `path` (a directory of other files, a file where a directory goes) is never deleted."""
    if not os.path.lexists(path):
        return
    if not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite")
    if kind == "file" and not os.path.isfile(path):
        raise FileExistsError(f"{path} is a directory, not a file from an earlier export; --force replaces only a "
                              "file: choose another output path")
    if kind == "adapter_dir" and not os.path.isdir(path):
        raise FileExistsError(f"{path} is a file, not an adapter directory; choose another --out")
    if kind == "model_dir":
        if not os.path.isdir(path):
            raise FileExistsError(f"{path} is a file, not a model directory; --force replaces only a model "
                                  "directory: choose another --out")
        other = sorted(e for e in os.listdir(path)
                       if e not in HF_MODEL_FILES and not e.startswith("model-0") and not e.startswith("."))
        if other:
            raise FileExistsError(f"{path} holds files that are not an exported model ({other[:5]}); --force "
                                  "replaces only a model directory: choose another --out")


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


from .gguf_export import GGUF_FAMILIES, GGUF_TYPES, export_gguf, export_gguf_adapter, permute_rotary  # noqa: E402
