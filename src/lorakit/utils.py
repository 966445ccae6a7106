"""Helpers that know nothing about LoRA: swapping submodules, and writing files or directories atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

from tqdm.auto import tqdm

if TYPE_CHECKING:  # annotations only: this module is imported by `lorakit --help`, which must not load torch
    from torch import nn


class PeftWarning(UserWarning):
    """Warnings about adapter settings that work but limit what the adapter can do later (PEFT's class)."""


def cache_root() -> str:
    """lorakit's cache directory: $XDG_CACHE_HOME/lorakit (default ~/.cache/lorakit)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lorakit")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (dotted path) is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent, module, its attribute name) for the submodule at dotted `key` (PEFT's helper, same name)."""
    parent_name, _, name = key.rpartition(".")
    return model.get_submodule(parent_name), model.get_submodule(key), name


def swap_modules(model: nn.Module, matches: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule `m` with `matches(m)` true by `make(m)`. Returns how many were replaced."""
    names = [n for n, m in model.named_modules() if matches(m)]
    for name in names:
        replace_module(model, name, make(model.get_submodule(name)))
    return len(names)


def _umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _clean_leftovers(path: str) -> None:
    """Temp files / directories a killed writer left beside `path`; a backup of a directory whose swap was
    interrupted (old moved aside, new not yet in place) is put back."""
    parent, name = os.path.split(os.path.abspath(path))
    backup = os.path.join(parent, f".{name}.old")
    if os.path.isdir(backup):
        if os.path.lexists(path):
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(backup, path)
    for entry in os.listdir(parent):
        if entry.startswith(f".{name}.") and entry.endswith(".tmp"):
            stale = os.path.join(parent, entry)
            shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)


def _apply_umask(path: str) -> None:
    """Give `path` (and, for a directory, everything in it) the modes open()/mkdir() give under the umask."""
    mask = _umask()
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextmanager
def atomic_path(path: str, directory: bool = False) -> Iterator[str]:
    """Yield a temp file (or, with `directory`, a temp directory) beside `path`; it replaces `path` only
    if the block succeeds, so readers see the old output or the whole new one, never a part. The result has
    the permissions a plain open()/mkdir() would give (the umask), not the temp file's 0600. Leftovers of a
    writer killed earlier are cleaned first. A directory is swapped in two renames with the old one kept
    aside until the new one is in place (a kill between them is repaired by the next call)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    _clean_leftovers(path)
    prefix = f".{os.path.basename(os.path.abspath(path))}."
    if directory:
        tmp = tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=parent)
        os.close(fd)
    try:
        yield tmp
        _apply_umask(tmp)  # writers (safetensors) may have created the files 0600
        if directory and os.path.isdir(path) and not os.path.islink(path):
            backup = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.old")
            os.replace(path, backup)  # a directory cannot be renamed onto a non-empty one
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            if directory and os.path.lexists(path):
                os.remove(path)
            os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


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


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode for the block, then back in the mode it was in (also after an exception)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """A step counter with rate and ETA (a no-op object when not `enabled`, e.g. on non-main ranks). The rate is the
    mean over all steps so far (smoothing=0): periodic evaluation steps spread over the ETA instead of swinging it."""
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, smoothing=0)


def forward_getattr(own_getattr: Callable[[str], Any], name: str, target: Callable[[], object | None]):
    """`__getattr__` of a wrapper module: its own lookup first (`super().__getattr__`: parameters, buffers,
    submodules), else the attribute of the object `target()` returns; when that is None the AttributeError stands."""
    try:
        return own_getattr(name)
    except AttributeError:
        inner = target()
        if inner is None:
            raise
        return getattr(inner, name)


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """Refuse a setting that is not an integer >= 1 (bools are not integers here), naming it."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
