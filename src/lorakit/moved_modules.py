"""Module paths from before the subpackage layout, kept working for one release.

`import lorakit.train_config` (or `from lorakit.model import LoraModel`) gives the module at its new path
(`lorakit.train.config`, `lorakit.adapters.model`), the same module object, with a DeprecationWarning naming
the new path. `lorakit.train`, `lorakit.serve` and `lorakit.export` are packages now; their `__init__` keeps
the names the old modules documented (`from lorakit.train import train` still works). The hook is the one
`install_as_peft()` uses for `peft` (ecosystem/module_aliases.py).
"""

from __future__ import annotations

import importlib
import warnings

from .ecosystem.module_aliases import ModuleAliases
from .ecosystem.module_aliases import install as install_finder

MOVED = {f"lorakit.{old}": f"lorakit.{new}" for old, new in {
    "adapter_files": "adapters.files", "checkpoint": "train.checkpoint", "config": "variants.lora_config",
    "data": "train.data", "default_targets": "variants.default_targets", "distributed": "train.distributed",
    "forms": "variants.registry", "gguf_export": "export.gguf", "gguf_tokenizer": "export.gguf_tokenizer",
    "inject": "adapters.inject", "loss": "train.loss", "memory_check": "train.memory_check",
    "merging": "adapters.arithmetic", "model": "adapters.model", "model_loading": "models.loading",
    "moe_targets": "adapters.moe_targets", "multi": "layers.mixed_batch", "peft_api": "adapters.peft_api",
    "peft_io": "adapters.peft_format", "plot": "train.plot", "projection_groups": "train.projection_groups",
    "saved_modules": "layers.modules_to_save", "serve_engine": "serve.engine", "status": "adapters.status",
    "synthetic_models": "models.synthetic", "task_models": "adapters.task_models", "train_config": "train.config",
    "train_setup": "train.setup", "trainable_tokens": "layers.trainable_tokens", "tuner": "adapters.tuner",
    "weight_tying": "adapters.weight_tying", "variants.form": "layers.form", "variants.rank_probe": "train.rank_probe",
}.items()}


def moved(old: str):
    warnings.warn(f"{old} moved to {MOVED[old]}; the old path works until the next release",
                  DeprecationWarning, stacklevel=3)
    return importlib.import_module(MOVED[old])


class MovedModuleFinder(ModuleAliases):
    """Resolves an old module path to the module at its new path (no second copy: the same object)."""

    def __init__(self):
        super().__init__(dict.fromkeys(MOVED, moved))


def install() -> None:
    install_finder(MovedModuleFinder())
