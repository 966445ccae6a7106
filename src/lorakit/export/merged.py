"""A merged transformers checkpoint: the adapter folded into the base weights, written as a standard model directory."""

from __future__ import annotations

import torch

from ..utils import atomic_path, check_target


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

