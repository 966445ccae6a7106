"""Preference data (DPO / ORPO): JSONL rows -> (prompt, chosen, rejected) token ids -> batches.

Row formats, as TRL reads them:
  standard        {"prompt": "...", "chosen": "...", "rejected": "..."}   (the tokenizer's EOS is appended to
                  each response that lacks it)
  conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}, or without "prompt":
                  the messages `chosen` and `rejected` share from the start are the prompt (TRL's extract_prompt)
Conversational rows are rendered with the chat template (the prompt with the generation prompt). As in TRL's
DPOTrainer, the prompt and each prompt+response are tokenized whole, and the response starts where the two token
sequences diverge (a token merged across the boundary belongs to the response).

Truncation (TRL's `keep_start`): prompt + response is cut to `max_length` tokens; a row whose prompt alone fills
`max_length` has no response left and is dropped (counted). A batch of n pairs is 2n rows, the n chosen rows then
the n rejected rows, right-padded; `completion_mask` marks the response tokens the log-probabilities sum over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..chat import check_messages, render_conversation, render_prompt
from .data import DataError, DataStats, read_rows, right_pad

@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_logps: tuple[float, float] | None = None  # reference log-probs of (chosen, rejected), when precomputed

    def __len__(self) -> int:  # tokens the pair puts through the model
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def split_prompt(row: dict) -> tuple[object, object, object]:
    """(prompt, chosen, rejected) of a row in either format, checked; conversational values stay message lists."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"missing field(s) {missing}: a preference row needs \"chosen\" and \"rejected\" (and "
                         f"\"prompt\" unless they are message lists sharing it); its keys are {sorted(row)}")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) or isinstance(rejected, str):
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{key!r} must be a string in a standard row (prompt, chosen and rejected all "
                                 f"strings), got {type(row.get(key)).__name__}")
        prompt = row["prompt"]
        if not chosen.strip() or not rejected.strip():
            raise ValueError(f"empty response: {'chosen' if not chosen.strip() else 'rejected'} has no text")
    else:
        chosen, rejected = check_messages(chosen, "'chosen'"), check_messages(rejected, "'rejected'")
        if "prompt" in row:
            prompt = check_messages(row["prompt"], "'prompt'")
        else:  # the shared leading messages are the prompt
            shared = 0
            while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
            if not prompt:
                raise ValueError("no \"prompt\" and chosen/rejected share no leading message to use as one")
        for key, turns in (("chosen", chosen), ("rejected", rejected)):
            if not any(m["role"] == "assistant" and m["content"].strip() for m in turns):
                raise ValueError(f"empty response: {key} has no assistant message with text")
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical: a pair must differ to say which is preferred")
    return prompt, chosen, rejected


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(prompt, chosen, rejected, tokenizer) -> PreferenceExample:
    """Token ids as TRL's DPOTrainer makes them (see the module docstring)."""
    if isinstance(prompt, str):
        eos = tokenizer.eos_token or ""
        chosen, rejected = (text if text.endswith(eos) else text + eos for text in (chosen, rejected))
        encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
        prompt_ids, full = encode(prompt), [encode(prompt + response) for response in (chosen, rejected)]
    else:
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        prompt_ids = encode(render_prompt(prompt, tokenizer))
        full = [encode(render_conversation(prompt + response, tokenizer)) for response in (chosen, rejected)]
    start = min(common_prefix_length(prompt_ids, ids) for ids in full)
    return PreferenceExample(prompt_ids[:start], full[0][start:], full[1][start:])


def truncate(example: PreferenceExample, max_length: int) -> tuple[PreferenceExample | None, bool]:
    """keep_start truncation of both sequences; None when the prompt leaves no room for a response."""
    room = max_length - len(example.prompt_ids)
    if room <= 0:
        return None, True
    cut = len(example.chosen_ids) > room or len(example.rejected_ids) > room
    return PreferenceExample(example.prompt_ids, example.chosen_ids[:room], example.rejected_ids[:room]), cut


def load_preference_examples(path: str, tokenizer, max_length: int) -> tuple[list[PreferenceExample], DataStats]:
    """Read and tokenize a preference file; a malformed row raises DataError naming file:line."""
    stats, examples = DataStats(), []
    for lineno, row in read_rows(path):
        try:
            example = tokenize_pair(*split_prompt(row), tokenizer)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        if not example.chosen_ids or not example.rejected_ids:
            raise DataError(f"{path}:{lineno}: empty response after tokenization")
        if example.chosen_ids == example.rejected_ids:
            raise DataError(f"{path}:{lineno}: chosen and rejected tokenize identically")
        stats.rows += 1
        example, cut = truncate(example, max_length)
        stats.truncated += cut
        if example is None:
            stats.dropped_empty += 1
            continue
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no usable preference rows (each row's prompt fills max_length={max_length}?)")
    return examples, stats


def collate_pairs(examples: list[PreferenceExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """2n right-padded rows (n chosen, then n rejected): input_ids, attention_mask, completion_mask, and
    ref_logps (2n) when every example carries precomputed reference log-probs."""
    sequences, completion = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for e in examples:
            response = getattr(e, side)
            sequences.append(e.prompt_ids + response)
            completion.append([0] * len(e.prompt_ids) + [1] * len(response))
    batch = {"input_ids": right_pad(sequences, pad_token_id),
             "attention_mask": right_pad([[1] * len(s) for s in sequences], 0),
             "completion_mask": right_pad(completion, 0)}
    if all(e.ref_logps is not None for e in examples):
        batch["ref_logps"] = torch.tensor([e.ref_logps[0] for e in examples] + [e.ref_logps[1] for e in examples],
                                          dtype=torch.float32)
    return batch
