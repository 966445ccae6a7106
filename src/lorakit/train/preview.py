"""A data file as the trainer will see it, before a run: every row read and tokenized with the run's own loaders
(so a bad file fails here, with the loader's message naming file and line), the first rows shown as decoded pieces
each marked masked (prompt: no loss) or trained (the answer the loss is on), and the held-out rows' prompts (the
validation split the run will make) for trying the finished adapter on.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

from . import data as D
from .config import TrainConfig
from .rows import load_rows


def _pieces(tokenizer, ids: list[int], trained: list[bool], part: str | None = None) -> list[dict]:
    """Consecutive tokens with the same flag, decoded as one piece each."""
    pieces, start = [], 0
    for flag, group in itertools.groupby(trained):
        n = len(list(group))
        pieces.append({"text": tokenizer.decode(ids[start:start + n]), "trained": flag,
                       **({"part": part} if part else {})})
        start += n
    return pieces


def example_pieces(example, tokenizer) -> list[dict]:
    """One tokenized row as pieces: SFT rows by their labels, preference pairs as prompt | chosen | rejected,
    GRPO prompts as the prompt alone (its completions are sampled during training)."""
    if hasattr(example, "chosen_ids"):
        return (_pieces(tokenizer, example.prompt_ids, [False] * len(example.prompt_ids), "prompt")
                + _pieces(tokenizer, example.chosen_ids, [True] * len(example.chosen_ids), "chosen")
                + _pieces(tokenizer, example.rejected_ids, [True] * len(example.rejected_ids), "rejected"))
    if not hasattr(example, "labels"):
        return _pieces(tokenizer, example.prompt_ids, [False] * len(example.prompt_ids), "prompt")
    return _pieces(tokenizer, example.input_ids, [label != D.IGNORE for label in example.labels])


def preview(cfg: TrainConfig, tokenizer, rows: int = 3) -> dict:
    """{rows: the first `rows` rows as pieces, total: rows the run will train on, log: the loader's line}.
    Raises DataError (or ValueError) for a file the run could not train on."""
    lines = []
    ordered = dataclasses.replace(cfg, val_fraction=0.0, packing=False, eval_data=None)  # file order, whole file
    examples = load_rows(ordered, tokenizer, lines.append)[0]
    log = lines[-1] if lines else ""
    if not cfg.eval_data:  # the split the run will make (the loader above was asked for none)
        train, held_out = D.split(examples, cfg.val_fraction, cfg.seed)
        log = re.sub(r"\d+ train / \d+ val", f"{len(train)} train / {len(held_out)} val", log)
    return {"rows": [example_pieces(e, tokenizer) for e in examples[:rows]], "total": len(examples), "log": log}


def prompt_text(row) -> str | None:
    """A row's prompt as a user would type it: the first user turn, an instruction (+ input), or a prompt."""
    if not isinstance(row, dict):
        return None
    turns = row.get("messages") or row.get("conversations") or (row["prompt"] if isinstance(row.get("prompt"), list)
                                                                else None)
    if isinstance(turns, list):
        for turn in turns:
            if isinstance(turn, dict) and (turn.get("role") == "user" or turn.get("from") == "human"):
                return str(turn.get("content", turn.get("value", "")))
        return None
    if "instruction" in row:
        return str(row["instruction"]) + (f"\n\n{row['input']}" if row.get("input") else "")
    return str(row["prompt"]) if isinstance(row.get("prompt"), str) else None


def heldout_prompts(cfg: TrainConfig, tokenizer, limit: int = 8) -> list[str]:
    """The prompts of the rows the run holds out (its validation split: the same rows, in the same order, as
    data.split gives the run; SFT rows with nothing to learn are dropped first, as load_examples drops them)."""
    if cfg.eval_data:
        return [p for p in (prompt_text(r) for _, r in D.read_rows(cfg.eval_data)) if p][:limit]
    rows = [row for _, row in D.read_rows(cfg.data)]
    if cfg.method == "sft" and cfg.task == "causal_lm":
        rows = [row for row in rows if any(label != D.IGNORE for label in D.encode(
            D.row_to_segments(row, tokenizer), tokenizer, cfg.max_length, cfg.train_on_prompt)[0].labels[1:])]
    return [p for p in (prompt_text(r) for r in D.split(rows, cfg.val_fraction, cfg.seed)[1]) if p][:limit]
