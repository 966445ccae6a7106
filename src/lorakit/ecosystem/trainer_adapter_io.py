"""transformers' Trainer saving, resuming and reloading the best checkpoint of a lorakit model through its adapter
files (installed on Trainer by guards.patch_trainer; each function gets the Trainer's original method and calls
it for any other model).

Trainer saves PreTrainedModel and the real peft's PeftModel by their save_pretrained, anything else as one full
`model.safetensors` (which fails on tied weights and is not an adapter). Here a lorakit model writes
adapter_config.json + adapter_model.safetensors (other adapters in subfolders), the files PEFT and lorakit load.
"""

from __future__ import annotations

import os

import torch
from transformers.trainer import TRAINING_ARGS_NAME

from ..adapters import LoraModel
from ..adapters.peft_format import load_adapter_weights, read_adapter


def _lorakit_model(trainer, model=None):
    model = trainer.accelerator.unwrap_model(model if model is not None else trainer.model, keep_torch_compile=False)
    return model if isinstance(model, LoraModel) else None


def save(trainer, original, output_dir: str | None = None, state_dict: dict | None = None) -> None:
    model = _lorakit_model(trainer)
    if model is None:
        return original(trainer, output_dir, state_dict)
    output_dir = output_dir if output_dir is not None else trainer.args.output_dir
    model.save_pretrained(output_dir, is_main_process=trainer.args.should_save)
    if not trainer.args.should_save:
        return None
    tokenizer = trainer.processing_class or getattr(trainer.data_collator, "tokenizer", None)  # as Trainer picks
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    torch.save(trainer.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # as Trainer does
    return None


def _load_adapters(model, checkpoint: str) -> None:
    """Every adapter of `model` from a checkpoint folder: 'default' in the folder itself, the others in
    subfolders named after them (as save_pretrained writes them)."""
    for name in model.peft_config:
        folder = checkpoint if name == "default" else os.path.join(checkpoint, name)
        if os.path.isdir(folder):
            _, state = read_adapter(folder)
            load_adapter_weights(model.model, name, state, source=folder)


def load_from_checkpoint(trainer, original, resume_from_checkpoint: str, model=None) -> None:
    target = _lorakit_model(trainer, model)
    if target is None:
        return original(trainer, resume_from_checkpoint, model)
    _load_adapters(target, resume_from_checkpoint)
    return None


def load_best_model(trainer, original) -> None:
    target = _lorakit_model(trainer)
    if target is None:
        return original(trainer)
    _load_adapters(target, trainer.state.best_model_checkpoint)
    return None
