"""Causal-LM training loss as a module (so DDP/FSDP can wrap it), with a fused fast path.

Fast path: run the decoder only, keep the hidden states of positions that have a label, and
compute lm_head + cross-entropy in chunks (`kernels.linear_cross_entropy_sum`): no full
(tokens x vocab) logits, and no lm_head work for prompt or padding positions. It applies when the
output head is a plain frozen Linear without bias and the model applies nothing after it
(no logit soft-capping/scaling); otherwise the reference path (full logits) runs.

Right-padded batches run without their padding mask: under causal attention a real token only
sees earlier positions, which are all real when padding is at the end, so every labelled
position's output is unchanged, and attention takes its mask-free causal kernel. Where the model runs
lorakit's padding-free attention (`kernels.varlen_attention`, set up by the training loop), the rows are
laid end to end without their padding instead, and attention runs per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import linear_cross_entropy_sum
from ..kernels.varlen_attention import VARLEN, unpad_batch
from .data import IGNORE

TOKEN_MULTIPLE = 16  # a padding-free batch's length is rounded up to this (fewer distinct matmul shapes)

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is 1s then 0s (padding only at the end); pad positions must carry no labels."""
    mask = attention_mask.bool()
    return bool(torch.all(mask[:, :-1] | ~mask[:, 1:]))


def runs_padding_free(base: nn.Module, input_ids: torch.Tensor) -> bool:
    """A right-padded batch of several rows goes through the decoder padding-free: the model runs lorakit's
    padding-free attention (switched on by the fast paths where proven)."""
    return input_ids.shape[0] > 1 and getattr(base.config, "_attn_implementation", None) == VARLEN


def fused_head_supported(model: nn.Module, frozen: bool = True) -> bool:
    """True when hidden -> logits is exactly `hidden @ lm_head.weight.T` (and, with `frozen`, lm_head is frozen)."""
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    return (callable(get_decoder) and type(head) is nn.Linear and head.bias is None
            and not (frozen and head.weight.requires_grad)
            and not any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS))


def count_next_token_targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class CausalLMLoss(nn.Module):
    """forward(batch) -> (sum of next-token losses over labelled positions) for a LoraModel."""

    count_targets = staticmethod(count_next_token_targets)  # what the loss sums over (the loop normalises by it)

    def __init__(self, peft_model: nn.Module, fused: bool = True, chunk_rows: int | None = None):
        super().__init__()
        self.peft_model = peft_model
        self.fused = fused
        self.chunk_rows = chunk_rows

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None) -> torch.Tensor:
        model = self.peft_model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if attention_mask is not None and position_ids is None and is_right_padded(attention_mask):
            if runs_padding_free(base, input_ids):
                # no work on padding positions; lengths rounded to a few shapes (see unpad_batch)
                packed = unpad_batch(input_ids, labels, attention_mask, multiple=TOKEN_MULTIPLE)
                input_ids, labels, position_ids = packed["input_ids"], packed["labels"], packed["position_ids"]
            attention_mask = None
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        targets = labels[:, 1:]
        if self.fused and fused_head_supported(base):
            hidden = base.get_decoder()(**inputs).last_hidden_state[:, :-1]
            keep = targets != IGNORE
            head = base.get_output_embeddings()
            return linear_cross_entropy_sum(hidden[keep], head.weight, targets[keep], self.chunk_rows)
        logits = self.peft_model(**inputs).logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def row_labels(labels: torch.Tensor) -> torch.Tensor:
    """The class of each row of a classification batch (data.py puts it at the row's last token)."""
    return labels.max(dim=1).values


class SequenceClassificationLoss(nn.Module):
    """forward(batch) -> sum over rows of the cross-entropy of the model's class logits (task: seq_cls)."""

    def __init__(self, peft_model: nn.Module, fused: bool = True):
        super().__init__()
        self.peft_model = peft_model

    @staticmethod
    def count_targets(batch: dict) -> int:
        return int(batch["labels"].shape[0])

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None) -> torch.Tensor:
        logits = self.peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
        return F.cross_entropy(logits.float(), row_labels(labels), reduction="sum")


class Seq2SeqLMLoss(nn.Module):
    """forward(batch) -> sum of the cross-entropy over target tokens of an encoder-decoder model (task: seq2seq);
    the model shifts the labels right into its decoder inputs, as transformers' seq2seq models do."""

    def __init__(self, peft_model: nn.Module, fused: bool = True):
        super().__init__()
        self.peft_model = peft_model

    @staticmethod
    def count_targets(batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None) -> torch.Tensor:
        logits = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")


LOSSES = {"causal_lm": CausalLMLoss, "seq_cls": SequenceClassificationLoss, "seq2seq": Seq2SeqLMLoss}
