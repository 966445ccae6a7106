"""A run's data rows, tokenized: SFT rows, classification / seq2seq rows, preference pairs or GRPO prompts."""

from __future__ import annotations

from . import data as D
from .config import TrainConfig
from .grpo import load_prompt_examples
from .preference_data import load_preference_examples


def load_rows(cfg: TrainConfig, tokenizer, log) -> tuple[list, list, list | None]:
    """(train rows, held-out rows, class names for seq_cls else None), tokenized; packed when `cfg.packing`."""
    classes = None
    if cfg.method == "grpo":
        examples, stats = load_prompt_examples(cfg.data, tokenizer, cfg.max_length)
        load_eval = lambda path: load_prompt_examples(path, tokenizer, cfg.max_length)[0]  # noqa: E731
    elif cfg.method != "sft":
        examples, stats = load_preference_examples(cfg.data, tokenizer, cfg.max_length)
        load_eval = lambda path: load_preference_examples(path, tokenizer, cfg.max_length)[0]  # noqa: E731
    elif cfg.task == "seq_cls":
        examples, stats, classes = D.load_classification_examples(cfg.data, tokenizer, cfg.max_length)
        load_eval = lambda path: D.load_classification_examples(path, tokenizer, cfg.max_length, classes)[0]  # noqa: E731
    elif cfg.task == "seq2seq":
        examples, stats = D.load_seq2seq_examples(cfg.data, tokenizer, cfg.max_length)
        load_eval = lambda path: D.load_seq2seq_examples(path, tokenizer, cfg.max_length)[0]  # noqa: E731
    else:
        examples, stats = D.load_examples(cfg.data, tokenizer, cfg.max_length, cfg.train_on_prompt)
        load_eval = lambda path: D.load_examples(path, tokenizer, cfg.max_length)[0]  # noqa: E731
    if cfg.eval_data:
        train_rows, val_rows = examples, load_eval(cfg.eval_data)
    else:
        train_rows, val_rows = D.split(examples, cfg.val_fraction, cfg.seed)
    if cfg.packing:
        train_rows = D.pack(train_rows, cfg.max_length)
    what = {"sft": "rows", "grpo": "prompts"}.get(cfg.method, "preference pairs")
    dropped = "their start cut" if cfg.method == "grpo" else f"{stats.dropped_empty} dropped with no response tokens"
    log(f"data: {stats.rows} {what} from {cfg.data} ({stats.truncated} truncated to {cfg.max_length} tokens, "
        f"{dropped}); {len(train_rows)} train / {len(val_rows)} val"
        + (f"; {len(classes)} classes" if classes is not None else ""))
    return train_rows, val_rows, classes
