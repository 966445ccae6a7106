"""What `import lorakit` does to transformers and TRL in this process (no switch needed, nothing on disk):

- transformers' `Trainer` saves, resumes and reloads-best a lorakit model through its adapter files
  (adapter_config.json + adapter_model.safetensors, as PEFT's models are saved) instead of writing the full
  model, which fails on tied embeddings ("Some tensors share memory") and is not an adapter;
- a TRL trainer given a lorakit config or model without `install_as_peft()` stops with one sentence naming the
  switch, instead of a TypeError or AttributeError from deep inside TRL, which only knows the real peft's classes.

Each patch runs when its module is imported (a post-import hook) or at once when it already is. The patched
methods act on lorakit models only and call the originals for everything else.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
from collections.abc import Callable

from .module_aliases import install

# imports inside functions: torch, transformers and lorakit.adapters load with a trainer (`import lorakit` stays light)

PATCHED = "__lorakit_patched__"


class PostImportHooks(importlib.abc.MetaPathFinder):
    """Runs `hooks[name](module)` right after the module `name` (or any `trl.*` for the prefix hooks) executes."""

    def __init__(self, hooks: dict[str, Callable], prefix_hooks: dict[str, Callable]):
        self.hooks, self.prefix_hooks = hooks, prefix_hooks

    def hook_for(self, name: str) -> Callable | None:
        if name in self.hooks:
            return self.hooks[name]
        return next((hook for prefix, hook in self.prefix_hooks.items() if name.startswith(prefix)), None)

    def find_spec(self, fullname, path=None, target=None):
        hook = self.hook_for(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:  # the module's real spec, from the finders after this one
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookedLoader(spec.loader, hook)
        return spec

    def patch_loaded(self) -> None:
        for name, module in list(sys.modules.items()):
            hook = self.hook_for(name)
            if hook is not None and module is not None:
                hook(module)


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader, hook):
        self.loader, self.hook = loader, hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.hook(module)

    def __getattr__(self, name):  # get_source, is_package, ... as the real loader answers them
        return getattr(self.loader, name)


def _is_lorakit_model(model) -> bool:
    from ..adapters import LoraModel

    return isinstance(model, LoraModel)


def patch_trainer(module) -> None:
    """transformers.trainer.Trainer: _save / _load_from_checkpoint / _load_best_model through adapter files."""
    trainer = getattr(module, "Trainer", None)
    if trainer is None or getattr(trainer, PATCHED, False):
        return
    from . import trainer_adapter_io as io

    for name, replacement in (("_save", io.save), ("_load_from_checkpoint", io.load_from_checkpoint),
                              ("_load_best_model", io.load_best_model)):
        setattr(trainer, name, _through(replacement, getattr(trainer, name)))
    setattr(trainer, PATCHED, True)


def _through(replacement, original):
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return replacement(self, original, *args, **kwargs)

    return method


def refusal(trainer_name: str, value) -> str:
    what = "model" if _is_lorakit_model(value) else "config"
    return (f"{trainer_name} was given a lorakit {what} ({type(value).__name__}), but TRL only accepts the real "
            "peft's classes. Call lorakit.install_as_peft() before importing trl (or run with LORAKIT_AS_PEFT=1), "
            "so that TRL's `peft` is lorakit")


def _lorakit_object(value) -> bool:
    from ..adapters import PeftConfig

    return _is_lorakit_model(value) or isinstance(value, PeftConfig)


def guard_trl_module(module) -> None:
    """Every transformers.Trainer subclass defined in a trl.* module refuses lorakit objects without the switch."""
    from transformers import Trainer

    for value in list(vars(module).values()):
        if (isinstance(value, type) and issubclass(value, Trainer) and value.__module__ == module.__name__
                and "__init__" in vars(value) and not vars(value).get(PATCHED, False)):
            value.__init__ = _refusing_init(value.__name__, vars(value)["__init__"])
            setattr(value, PATCHED, True)


def _refusing_init(trainer_name: str, init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        from .as_peft import is_installed

        if not is_installed():
            for value in (*args, *kwargs.values()):
                if _lorakit_object(value):
                    raise TypeError(refusal(trainer_name, value))
        init(self, *args, **kwargs)

    return __init__


def install_guards() -> None:
    """Install the post-import hooks (once) and patch the modules already imported."""
    hooks = install(PostImportHooks({"transformers.trainer": patch_trainer}, {"trl.": guard_trl_module}))
    hooks.patch_loaded()
