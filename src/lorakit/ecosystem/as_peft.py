"""`install_as_peft()`: make `import peft` (and every `peft.*` module trl, transformers and accelerate import)
resolve to lorakit, so code written for PEFT — TRL's trainers, transformers' Trainer and adapter API — runs on
lorakit unchanged. Nothing on disk changes: an import hook (the one moved_modules.py uses) answers the names, and
a metadata finder answers `importlib.metadata.version("peft")` where the real peft is not installed.

The same switch from the environment: `LORAKIT_AS_PEFT=1`, read by `import lorakit`. A script that never imports
lorakit runs unchanged with `python -m lorakit.as_peft SCRIPT.py [ARGS]` (lorakit/as_peft.py), which turns the
switch on and then runs the script as `__main__`.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

from .module_aliases import ModuleAliases, install
from .peft_namespace import PEFT_STAND_IN_VERSION, PEFT_MODULES, build_module, missing_module

ENV_SWITCH = "LORAKIT_AS_PEFT"


class PeftDistribution(importlib.metadata.Distribution):
    """The metadata `importlib.metadata.version("peft")` reads while lorakit stands in for peft."""

    def read_text(self, filename):
        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: peft\nVersion: {PEFT_STAND_IN_VERSION}\nSummary: lorakit standing in\n"
        return None

    def locate_file(self, path):
        return os.path.join(os.path.dirname(__file__), str(path))


class PeftAliases(ModuleAliases):
    """`peft` and `peft.*` as lorakit's stand-in modules."""

    def __init__(self):
        super().__init__(dict.fromkeys(PEFT_MODULES, build_module), claims=lambda name: name.startswith("peft."),
                         fallback=missing_module)

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        return iter([PeftDistribution()] if context.name in ("peft",) else [])


def is_installed() -> bool:
    """Whether lorakit stands in for peft in this process."""
    return getattr(sys.modules.get("peft"), "__lorakit__", False) or any(isinstance(f, PeftAliases)
                                                                          for f in sys.meta_path)


def install_as_peft() -> None:
    """Make `import peft` resolve to lorakit in this process (idempotent). Call it before importing trl or
    transformers' Trainer; refused (RuntimeError) when the real peft is already imported.

    >>> import lorakit; lorakit.install_as_peft()     # doctest: +SKIP
    >>> from trl import SFTTrainer                    # TRL's PEFT paths now see lorakit  # doctest: +SKIP
    """
    real = sys.modules.get("peft")
    if real is not None and not getattr(real, "__lorakit__", False):
        where = getattr(real, "__file__", None) or "an unknown location"
        raise RuntimeError(
            f"install_as_peft(): the real peft package is already imported in this process (from {where}), so "
            "objects made by it would mix with lorakit's. Call lorakit.install_as_peft() (or set LORAKIT_AS_PEFT=1) "
            "before anything imports peft — trl, transformers' Trainer and accelerate import it when they load")
    install(PeftAliases())
    stale = _transformers_decided_without_peft()
    if stale:
        raise RuntimeError(f"install_as_peft(): {stale} was imported before the switch and decided that peft is "
                           "not installed; call lorakit.install_as_peft() before importing transformers' Trainer or trl")


def _transformers_decided_without_peft() -> str | None:
    """transformers caches `is_peft_available()`; a False cached before the switch would hide lorakit."""
    utils = sys.modules.get("transformers.utils.import_utils")
    check = getattr(utils, "is_peft_available", None)
    if check is None or check():
        return None
    return "transformers"


def install_from_environment() -> bool:
    """install_as_peft() when LORAKIT_AS_PEFT is set to 1/true/yes; returns whether it did."""
    if os.environ.get(ENV_SWITCH, "").strip().lower() not in ("1", "true", "yes", "on"):
        return False
    install_as_peft()
    return True
