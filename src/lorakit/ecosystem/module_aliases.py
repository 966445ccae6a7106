"""One import hook for every module name lorakit answers under another name: the module paths from before the
subpackage layout (moved_modules.py) and, after `install_as_peft()`, `peft` and its submodules (peft_namespace.py).

A table maps a module name to a function that builds (or finds) the module; the finder answers exactly those
names, so every other import goes to the normal machinery. Imports nothing heavy: `import lorakit` stays light.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType


class ModuleAliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A meta-path finder + loader for the names in `table` (name -> builder returning the module object).

    A builder may return an existing module (an alias: the same object, its own spec kept) or a new one."""

    def __init__(self, table: dict[str, Callable[[str], ModuleType]], claims: Callable[[str], bool] | None = None,
                 fallback: Callable[[str], ModuleType] | None = None):
        self.table = table
        self.claims = claims or (lambda name: False)  # names outside the table this finder still answers
        self.fallback = fallback                         # ... built by this (e.g. one that raises a clear error)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.table or self.claims(fullname):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        build = self.table.get(spec.name) or self.fallback
        module = build(spec.name)
        spec.loader_state = getattr(module, "__spec__", None)  # the import system stamps `spec` on it next
        return module

    def exec_module(self, module):
        own = module.__spec__.loader_state
        if own is not None and own.name != module.__spec__.name:
            module.__spec__ = own  # an alias keeps its own identity


def install(finder: ModuleAliases) -> ModuleAliases:
    """Put `finder` first on sys.meta_path (once per finder type); returns the installed one."""
    for existing in sys.meta_path:
        if type(existing) is type(finder):
            return existing
    sys.meta_path.insert(0, finder)
    return finder
