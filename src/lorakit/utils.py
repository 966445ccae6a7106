"""Helpers that know nothing about LoRA: swapping submodules, and writing files or directories atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator

from torch import nn
from tqdm.auto import tqdm


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (dotted path) is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_modules(model: nn.Module, matches: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule `m` with `matches(m)` true by `make(m)`. Returns how many were replaced."""
    names = [n for n, m in model.named_modules() if matches(m)]
    for name in names:
        replace_module(model, name, make(model.get_submodule(name)))
    return len(names)


@contextmanager
def atomic_path(path: str, directory: bool = False) -> Iterator[str]:
    """Yield a temp file (or, with `directory`, a temp directory) beside `path`; it replaces `path` only
    if the block succeeds, so readers see the old output or the whole new one, never a part."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(os.path.abspath(path))}."
    if directory:
        tmp = tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=parent)
        os.close(fd)
    try:
        yield tmp
        if directory and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)  # a directory cannot be renamed onto a non-empty one
        elif directory and os.path.lexists(path):
            os.remove(path)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """A step counter with rate and ETA (a no-op object when not `enabled`, e.g. on non-main ranks)."""
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
