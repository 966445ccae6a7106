"""Module paths from before the subpackage layout, kept working for one release.

`import lorakit.train_config` (or `from lorakit.model import LoraModel`) gives the module at its new path
(`lorakit.train.config`, `lorakit.adapters.model`), the same module object, with a DeprecationWarning naming
the new path. `lorakit.train`, `lorakit.serve` and `lorakit.export` are packages now; their `__init__` keeps
the names the old modules documented (`from lorakit.train import train` still works).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

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


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new path (no second copy: the same object)."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old path works until the next release",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__  # the import system stamps the old name's spec on the module next
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # give the module its own spec back


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
