"""Training data: file formats -> token ids + labels (-100 where no loss), batching and packing.

Row formats (JSON list, JSONL, CSV with a header line, Parquet, or a .txt file):
  chat        {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
  ShareGPT    {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}
  alpaca      {"instruction": ..., "input": optional, "output": ...}
  completion  {"prompt": ..., "completion": ...}
  text        {"text": ...} or a .txt file (one document per blank-line-separated block)
Chat-like rows use the tokenizer's chat template. By default only response tokens (assistant
turns, completions) carry loss; `train_on_prompt=True` puts loss on every token.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

import torch

from ..chat import chat_messages, chat_segments
from . import table_files
from .table_files import DataError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Seq2SeqExample:
    """An encoder input and the decoder's target tokens (task: seq2seq)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids) + len(self.labels)


@dataclass
class DataStats:
    rows: int = 0
    truncated: int = 0
    dropped_empty: int = 0


def read_text(path: str) -> str:
    """The file as UTF-8 text; a byte that is not UTF-8 is reported with its line and column."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); "
                        "save the file as UTF-8") from None


def read_rows(path: str) -> list[tuple[int, dict | str]]:
    """(line number, row) pairs. JSON arrays give each element's index + 1 as its 'line'."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    if path.endswith(".parquet"):
        return table_files.parquet_rows(path)
    text = read_text(path)
    if path.endswith(".csv"):
        return table_files.csv_rows(path, text)
    if path.endswith(".txt"):
        blocks = [b.strip() for b in text.split("\n\n")]
        return [(i + 1, {"text": b}) for i, b in enumerate(blocks) if b]
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        return list(enumerate(data, start=1))
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return rows


def row_to_segments(row: dict, tokenizer) -> list[tuple[str, bool]]:
    """Render a row as text segments, each flagged whether it is a response (loss) segment."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row or "conversations" in row:
        return chat_segments(chat_messages(row), tokenizer)
    if "instruction" in row and "output" in row:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return chat_segments([{"role": "user", "content": prompt},
                              {"role": "assistant", "content": row["output"]}], tokenizer)
    if "prompt" in row and "completion" in row:
        return [(_text(row, "prompt"), False), (_text(row, "completion") + (tokenizer.eos_token or ""), True)]
    if "text" in row:
        return [(_text(row, "text") + (tokenizer.eos_token or ""), True)]
    raise ValueError(f"row has none of the known fields (messages, conversations, instruction+output, "
                     f"prompt+completion, text); its keys are {sorted(row)}")


def _text(row: dict, key: str) -> str:
    if not isinstance(row[key], str):
        raise ValueError(f"field {key!r} must be a string, got {type(row[key]).__name__}")
    return row[key]




def read_prompts(path: str) -> list[str]:
    """The non-empty lines of a prompts file."""
    if not os.path.isfile(path):
        raise DataError(f"prompts file {path} does not exist")
    return [line.strip() for line in read_text(path).split("\n") if line.strip()]


def encode(segments: list[tuple[str, bool]], tokenizer, max_length: int, train_on_prompt: bool):
    """Token ids and labels for the segments; returns (Example, was_truncated)."""
    ids, labels = [], []
    for i, (text, is_response) in enumerate(segments):
        piece = tokenizer(text, add_special_tokens=(i == 0))["input_ids"]
        ids += piece
        labels += piece if (is_response or train_on_prompt) else [IGNORE] * len(piece)
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length]), truncated


def load_examples(path: str, tokenizer, max_length: int, train_on_prompt: bool = False):
    """Read and tokenize a data file. Raises DataError naming file and line for a malformed row."""
    stats = DataStats()
    examples = []
    for lineno, row in read_rows(path):
        try:
            example, truncated = encode(row_to_segments(row, tokenizer), tokenizer, max_length, train_on_prompt)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        stats.rows += 1
        stats.truncated += truncated
        if all(label == IGNORE for label in example.labels[1:]):
            stats.dropped_empty += 1  # nothing left to learn after truncation
            continue
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no usable rows")
    return examples, stats


def load_classification_examples(path: str, tokenizer, max_length: int, label_names: list | None = None):
    """Rows {"text": ..., "label": ...} for sequence classification. Labels are class indices (integers >= 0)
    or names (strings, numbered in sorted order; pass the training file's `label_names` for its eval file).
    Each Example carries its class at its last token (other positions IGNORE), so batches collate as usual.
    Returns (examples, stats, label_names)."""
    rows = read_rows(path)
    labels = [row.get("label") if isinstance(row, dict) else None for _, row in rows]
    named = any(isinstance(label, str) for label in labels)
    if label_names is None:
        label_names = sorted({l for l in labels if isinstance(l, str)}) if named else \
            list(range(max([l for l in labels if isinstance(l, int) and not isinstance(l, bool)], default=0) + 1))
    index = {name: i for i, name in enumerate(label_names)}
    stats, examples = DataStats(), []
    for (lineno, row), label in zip(rows, labels):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f"{path}:{lineno}: a classification row needs a non-empty \"text\" string and a "
                            "\"label\"")
        if isinstance(label, bool) or label not in index:
            known = label_names if len(label_names) <= 10 else f"{len(label_names)} classes"
            raise DataError(f"{path}:{lineno}: label {label!r} is not one of the classes ({known}); labels are "
                            "integers >= 0 or names, one kind per file")
        ids = tokenizer(row["text"])["input_ids"]
        stats.rows += 1
        stats.truncated += len(ids) > max_length
        ids = ids[:max_length]
        examples.append(Example(ids, [IGNORE] * (len(ids) - 1) + [index[label]]))
    return examples, stats, label_names


def load_seq2seq_examples(path: str, tokenizer, max_length: int):
    """Rows {"input": ..., "target": ...} for an encoder-decoder model (T5, BART): the input tokenized as the
    encoder's, the target as the decoder's labels (each truncated to max_length). Returns (examples, stats)."""
    stats, examples = DataStats(), []
    for lineno, row in read_rows(path):
        if not (isinstance(row, dict) and all(isinstance(row.get(k), str) and row[k].strip()
                                              for k in ("input", "target"))):
            raise DataError(f"{path}:{lineno}: a seq2seq row needs non-empty \"input\" and \"target\" strings")
        ids = tokenizer(row["input"])["input_ids"]
        labels = tokenizer(text_target=row["target"])["input_ids"]
        stats.rows += 1
        stats.truncated += len(ids) > max_length or len(labels) > max_length
        examples.append(Seq2SeqExample(ids[:max_length], labels[:max_length]))
    return examples, stats


def split(examples: list[Example], val_fraction: float, seed: int):
    """Deterministic train/validation split. With val_fraction 0 the rows keep their file order
    (batches are shuffled per epoch by the training loop either way)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(examples) * val_fraction))
    if val_fraction > 0 and len(examples) > 1:
        n_val = max(1, n_val)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate examples into rows of at most max_length tokens. Positions restart at 0 for each
    example; with no padding mask, transformers (>= 4.56) turns restarting positions into a
    block-diagonal causal mask, so packed examples cannot attend to each other."""
    packs, current = [], Example([], [], [])
    for ex in examples:
        if current.input_ids and len(current) + len(ex) > max_length:
            packs.append(current)
            current = Example([], [], [])
        current.input_ids += ex.input_ids
        current.labels += [IGNORE] + ex.labels[1:]  # never predict across a boundary
        current.position_ids += list(range(len(ex)))
    if current.input_ids:
        packs.append(current)
    return packs


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Packed rows get position_ids and no attention mask. Seq2seq rows: inputs
    (with their mask) and labels padded each to their own longest."""
    ids = right_pad([e.input_ids for e in examples], pad_token_id)
    labels = right_pad([e.labels for e in examples], IGNORE)
    if any(getattr(e, "position_ids", None) for e in examples):
        width = ids.shape[1]  # padding continues each row's positions from 0: it forms its own block
        positions = right_pad([(e.position_ids or list(range(len(e)))) + list(range(width - len(e)))
                               for e in examples], 0)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    mask = right_pad([[1] * len(e.input_ids) for e in examples], 0)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def right_pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    """Rows of token ids (labels, flags) as one long tensor, each right-padded with `fill` to the longest."""
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def check_one_batch(rows: int, rows_per_batch: int, packed: bool) -> None:
    """Refuse a training set smaller than one batch (all processes together), saying what to change."""
    if rows < rows_per_batch:
        after = " after packing (try --packing false)" if packed else ""
        raise ValueError(f"{rows} training rows{after} is fewer than one batch of {rows_per_batch} rows "
                         f"(lower --batch_size or add data)")
