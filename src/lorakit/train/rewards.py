"""Reward functions for GRPO: built-ins, user functions by import path, and the checked call.

A reward function has TRL's signature: `fn(prompts, completions, completion_ids, **columns) -> list[float | None]`,
one value per completion; `columns` are the data file's other fields (one value per completion, repeated over a
prompt's generations). Completions are strings for text prompts and `[{"role": "assistant", "content": ...}]` for
message prompts, as in TRL. None means "not applicable to this completion" (TRL's convention).

In a config, `rewards` is a list of entries, each a name or a mapping:
  - format_match                       # built-in by name
  - {name: exact_answer, column: answer, weight: 2.0}
  - mypkg.rewards:correct              # a user function: module path : attribute
Built-ins: `format_match` (1.0 when the completion matches `pattern`, default `<answer>...</answer>` around a
number), `exact_answer` (1.0 when the text inside the answer tags, else the last number, equals the row's `column`),
`length_target` (1 - |tokens - target| / target, at least -1).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

ANSWER_TAGS = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
DEFAULT_FORMAT = r"<answer>\s*-?\d+(\.\d+)?\s*</answer>"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class RewardError(ValueError):
    """A reward function that could not be loaded, raised, or returned something unusable; names it and the row."""


def completion_text(completion) -> str:
    """The text of a completion in either of TRL's forms."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def format_match(prompts, completions, pattern: str = DEFAULT_FORMAT, **_) -> list[float]:
    """1.0 when the completion contains a match of `pattern`, else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)
    return [1.0 if compiled.search(completion_text(c)) else 0.0 for c in completions]


def extract_answer(text: str) -> str | None:
    """The text inside the last <answer>...</answer>, else the last number in `text`, else None."""
    tagged = ANSWER_TAGS.findall(text)
    if tagged:
        return tagged[-1].strip()
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _same_answer(given: str | None, expected) -> bool:
    if given is None:
        return False
    try:
        return math.isclose(float(given), float(expected), rel_tol=0, abs_tol=1e-9)
    except (TypeError, ValueError):
        return given.strip().lower() == str(expected).strip().lower()


def exact_answer(prompts, completions, column: str = "answer", **columns) -> list[float]:
    """1.0 when the completion's answer (see extract_answer) equals the row's `column` value, else 0.0."""
    if column not in columns:
        raise KeyError(f"exact_answer needs the data column {column!r}; the rows have {sorted(columns)}")
    return [1.0 if _same_answer(extract_answer(completion_text(c)), expected) else 0.0
            for c, expected in zip(completions, columns[column])]


def length_target(prompts, completions, completion_ids=None, target: int = 64, **_) -> list[float]:
    """1 - |length - target| / target (floored at -1), length in completion tokens (characters / 4 without ids)."""
    lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else \
        [len(completion_text(c)) / 4 for c in completions]
    return [max(-1.0, 1.0 - abs(n - target) / target) for n in lengths]


BUILTINS: dict[str, Callable] = {"format_match": format_match, "exact_answer": exact_answer,
                                 "length_target": length_target}


@dataclass
class Reward:
    name: str                     # as metrics name it: rewards/<name>/mean
    fn: Callable
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _cwd_on_path():
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        if added:
            sys.path.remove(os.getcwd())


def import_function(path: str) -> Callable:
    """`module.path:attribute` -> the callable; a RewardError saying what is missing otherwise."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise RewardError(f"reward {path!r}: a user reward is 'module.path:function' (built-ins: {sorted(BUILTINS)})")
    try:
        with _cwd_on_path():  # `lorakit train` is a console script: a module in the current directory is found too
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward {path!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise RewardError(f"reward {path!r}: module {module_name!r} has no function {attribute!r}")
    return fn


def load_rewards(specs: list) -> list[Reward]:
    """The `rewards` setting -> Reward objects (built-ins by name, user functions by import path)."""
    if not isinstance(specs, list) or not specs:
        raise RewardError(f"method: grpo needs rewards: a non-empty list of reward functions (built-ins: "
                          f"{sorted(BUILTINS)}, or module.path:function), got {specs!r}")
    rewards = []
    for spec in specs:
        options = dict(spec) if isinstance(spec, dict) else {"name": spec}
        name = options.pop("name", None)
        weight = options.pop("weight", 1.0)
        if not isinstance(name, str) or not name:
            raise RewardError(f"reward entry {spec!r}: needs a name (a built-in or module.path:function)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RewardError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
        fn = BUILTINS.get(name) or import_function(name)
        rewards.append(Reward(name, fn, float(weight), options))
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise RewardError(f"rewards: each function once (got {names})")
    return rewards


def _describe(prompt) -> str:
    text = completion_text(prompt) if isinstance(prompt, list) else str(prompt)
    return text if len(text) <= 60 else text[:57] + "..."


def _first_failing_row(reward: Reward, prompts, completions, completion_ids, columns) -> int | None:
    for i in range(len(completions)):
        try:
            reward.fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                      completion_ids=completion_ids[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()},
                      **reward.options)
        except Exception:  # noqa: BLE001 - locating the row that raises
            return i
    return None


def score(rewards: list[Reward], prompts: list, completions: list, completion_ids: list[list[int]],
          columns: dict[str, list]) -> torch.Tensor:
    """(completions, functions) float64 rewards, NaN where a function returned None. Any other failure stops with
    a RewardError naming the function and the completion's row (its prompt)."""
    n = len(completions)
    out = torch.full((n, len(rewards)), float("nan"), dtype=torch.float64)
    for k, reward in enumerate(rewards):
        try:
            values = reward.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns,
                               **reward.options)
        except Exception as e:  # noqa: BLE001 - any user error becomes one clear message
            row = _first_failing_row(reward, prompts, completions, completion_ids, columns)
            where = f" on completion {row} (prompt {_describe(prompts[row])!r})" if row is not None else ""
            raise RewardError(f"reward function {reward.name} raised {type(e).__name__}: {e}{where}") from e
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward function {reward.name} returned {type(values).__name__}, not a list of "
                              f"{n} numbers") from None
        if len(values) != n:
            raise RewardError(f"reward function {reward.name} returned {len(values)} values for {n} completions")
        for i, value in enumerate(values):
            if value is None:
                continue
            scalar_tensor = isinstance(value, torch.Tensor) and value.numel() == 1
            if isinstance(value, bool) or not (isinstance(value, numbers.Real) or scalar_tensor):
                raise RewardError(f"reward function {reward.name} returned {value!r} for completion {i} (prompt "
                                  f"{_describe(prompts[i])!r}): expected a number or None")
            value = float(value)
            if not math.isfinite(value):
                raise RewardError(f"reward function {reward.name} returned {value} for completion {i} (prompt "
                                  f"{_describe(prompts[i])!r}): rewards must be finite")
            out[i, k] = value
    return out
