"""What the Train view may set, turned into the TrainConfig `lorakit train` runs, and the paths it may touch.

Only the settings in OFFERED come from the page (anything else is a 400 naming what is allowed); the model is the
server's own base (so the finished adapter loads into this server), the output directory is RUNS/NAME, the data
file a path under the data root. `confined_path` resolves symlinks before checking, so a link pointing out of the
root is refused like `../`.
"""

from __future__ import annotations

import os
import re

from ..train.config import DEMO_LORA, TrainConfig
from ..train.rewards import BUILTINS
from ..serve.errors import InvalidRequest, NotFound

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}, "vera": {"peft_type": "VERA"}}
OFFERED = {  # setting: (allowed values or type, the page's default)
    "data": ("a path under the data root", None),
    "method": (["sft", "dpo", "orpo", "grpo"], "sft"),
    "r": ("integer >= 1", 8),
    "lora_alpha": ("number > 0", 16),
    "target_modules": ("list of module names", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "variant": (sorted(VARIANTS), "lora"),
    "quantize": ("true (4-bit NF4 base) | false", False),
    "max_steps": ("integer >= 1", 30),
    "lr": ("number > 0", 6e-4),
    "bf16": (["auto", True, False], "auto"),
    "batch_size": ("integer >= 1", 8),
    "max_length": ("integer >= 1", 512),
    "eval_every": ("integer >= 1", 10),
    "seed": ("integer", 0),
    "rewards": (f"a list of built-in reward names for GRPO ({', '.join(sorted(BUILTINS))}); the page names no "
                "module of its own (a module path would run code)", ["exact_answer"]),
}


def run_name(name) -> str:
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise InvalidRequest(f"run name {name!r} must be 1-64 letters, digits, '-' or '_' (starting with a letter "
                             "or digit)", "invalid_name")
    return name


def confined_path(root: str, relative, must_exist: bool = True) -> str:
    """`root/relative` with every symlink resolved, which must stay inside `root` (InvalidRequest saying why)."""
    if not isinstance(relative, str) or not relative.strip():
        raise InvalidRequest(f"data path must be a non-empty string relative to the data root, got {relative!r}",
                             "invalid_path")
    if os.path.isabs(relative):
        raise InvalidRequest(f"data path {relative!r} must be relative to the data root, not absolute",
                             "path_outside_root")
    real_root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(real_root, relative))
    if os.path.commonpath([full, real_root]) != real_root:
        why = "'..' leads out of it" if ".." in relative.replace("\\", "/").split("/") else "a symlink leads out of it"
        raise InvalidRequest(f"data path {relative!r} is outside the data root ({why})", "path_outside_root")
    if must_exist and not os.path.isfile(full):
        raise NotFound(f"no data file {relative!r} under the data root", "data_not_found")
    return full


def data_files(root: str | None) -> list[str]:
    """Data files under `root` (relative paths, sorted), symlinks leading out of it left out."""
    if not root or not os.path.isdir(root):
        return []
    found, real_root = [], os.path.realpath(root)
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(directory, name)
            if name.endswith(DATA_SUFFIXES) and os.path.commonpath([os.path.realpath(path), real_root]) == real_root:
                found.append(os.path.relpath(path, root))
    return sorted(found)


def _check(name: str, value, ok: bool) -> None:
    if not ok:
        raise ValueError(f"setting {name} must be {OFFERED[name][0]}, got {value!r}")


def train_config(settings, model: str, data_root: str, output_dir: str) -> TrainConfig:
    """The TrainConfig of the page's `settings` (defaults as OFFERED), for the server's base `model`."""
    if not isinstance(settings, dict):
        raise ValueError("give 'settings' as an object of the run's settings")
    unknown = sorted(set(settings) - set(OFFERED))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; the Train view sets {sorted(OFFERED)}")
    given = {name: settings.get(name, default) for name, (_, default) in OFFERED.items()}
    _check("method", given["method"], given["method"] in OFFERED["method"][0])
    _check("variant", given["variant"], given["variant"] in VARIANTS)
    _check("bf16", given["bf16"], given["bf16"] in ("auto", True, False))
    _check("quantize", given["quantize"], isinstance(given["quantize"], bool))
    targets = given["target_modules"]
    _check("target_modules", targets, isinstance(targets, list) and targets and all(
        isinstance(t, str) and re.fullmatch(r"[A-Za-z0-9_.]+", t) for t in targets))
    rewards = given["rewards"]
    _check("rewards", rewards, isinstance(rewards, list) and rewards and all(r in BUILTINS for r in rewards))
    data = confined_path(data_root, given["data"])
    local_model = os.path.abspath(model) if os.path.exists(model) else model
    return TrainConfig(
        model=local_model, data=data, output_dir=os.path.abspath(output_dir), method=given["method"],
        max_steps=given["max_steps"], lr=given["lr"], bf16=given["bf16"], batch_size=given["batch_size"],
        max_length=given["max_length"], eval_every=given["eval_every"], seed=given["seed"],
        quantize="nf4" if given["quantize"] else None, rewards=rewards if given["method"] == "grpo" else None,
        lora={**DEMO_LORA, "r": given["r"], "lora_alpha": given["lora_alpha"], "target_modules": targets,
              **VARIANTS[given["variant"]]})  # as load_train_config fills the lora section
