"""transformers' Trainer for a lorakit model: `AdapterTrainer` saves and resumes the adapter in PEFT's format.

Trainer saves PreTrainedModel and PEFT's PeftModel by their save_pretrained and anything else as one full
`model.safetensors` (which fails on tied weights and is not an adapter). AdapterTrainer writes `save_model()`
and every checkpoint with the model's own save_pretrained (adapter_config.json + adapter_model.safetensors, the
files PEFT and lorakit load) and resumes from such a checkpoint:

    from lorakit.train.hf_trainer import AdapterTrainer
    trainer = AdapterTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=rows)
    trainer.train(); trainer.save_model("out")   # out/ loads with PeftModel.from_pretrained

A lorakit model in the plain `Trainer` trains too (the task classes name PEFT's forward arguments); only saving
needs this class.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from ..adapters import LoraModel
from ..adapters.peft_format import load_adapter_weights, read_adapter


class AdapterTrainer(Trainer):
    """Trainer whose saves and resumes go through the lorakit model's adapter files."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, LoraModel):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # as Trainer does

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        target = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        if not isinstance(target, LoraModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name in target.peft_config:  # 'default' in the folder itself, others in subfolders (save_pretrained)
            folder = resume_from_checkpoint if name == "default" else os.path.join(resume_from_checkpoint, name)
            if os.path.isdir(folder):
                _, state = read_adapter(folder)
                load_adapter_weights(target.model, name, state, source=folder)

    def _load_best_model(self) -> None:
        if isinstance(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), LoraModel):
            self._load_from_checkpoint(self.state.best_model_checkpoint)
            return
        super()._load_best_model()
