"""Keep the activations autograd saves for backward in bf16 while the compute stays fp32.

On a CPU without fast bf16 matmuls (AVX2-only: bf16 matmul is ~10x slower than fp32 there) the
training step computes in fp32, and the fp32 activations saved between forward and backward are
most of its peak memory. Inside `compressed_activations()` every floating tensor autograd saves
(larger than `min_numel`, not a parameter) is stored as bf16 and cast back to fp32 when backward
needs it: the forward is unchanged, backward sees inputs rounded to bf16 (8-bit mantissa), which
is what a bf16 training run's backward sees anyway. Parameters (frozen weights, adapters) are
never copied. A tensor saved by several functions (one normed hidden state read by q, k and v) is
stored once. `stored_as=torch.float32` is the reference path: nothing changes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SavedBytes:
    """Saved non-parameter tensors: bytes autograd would have kept, and bytes actually kept."""

    original: int = 0
    stored: int = 0


EXACT = "_lorakit_keep_exact"


def keep_exact(t: torch.Tensor) -> torch.Tensor:
    """Mark `t` (e.g. adapter factors stacked for one call) to be saved for backward as it is, like a parameter."""
    setattr(t, EXACT, True)
    return t


class _Packed:
    __slots__ = ("tensor", "dtype")

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype):
        self.tensor, self.dtype = tensor, dtype


class compressed_activations(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: saved fp32 activations are stored as `stored_as` (bf16) until backward.

    >>> with compressed_activations():  # doctest: +SKIP
    ...     loss = model(**batch).loss
    >>> loss.backward()
    """

    def __init__(self, stored_as: torch.dtype = torch.bfloat16, min_numel: int = 4096,
                 counts: SavedBytes | None = None):
        if stored_as not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"stored_as must be torch.bfloat16, torch.float16 or torch.float32, got {stored_as}")

        # id(tensor) -> (weak reference, version, packed): the same live, unmodified tensor is packed once
        packed_before: dict[int, tuple] = {}

        def pack(t: torch.Tensor):
            if isinstance(t, nn.Parameter) or getattr(t, EXACT, False):  # parameters (kept anyway), or marked
                return t
            kept = t
            if t.dtype is torch.float32 and stored_as is not torch.float32 and t.numel() >= min_numel:
                ref, version, kept = packed_before.get(id(t), (None, None, None))
                if ref is None or ref() is not t or version != t._version:
                    kept = _Packed(t.to(stored_as), t.dtype)
                    packed_before[id(t)] = (weakref.ref(t), t._version, kept)
                elif counts is not None:  # a second save of the same tensor costs nothing
                    counts.original += t.numel() * t.element_size()
                    return kept
            if counts is not None:
                counts.original += t.numel() * t.element_size()
                stored = kept.tensor if isinstance(kept, _Packed) else kept
                counts.stored += stored.numel() * stored.element_size()
            return kept

        def unpack(t):
            return t.tensor.to(t.dtype) if isinstance(t, _Packed) else t

        super().__init__(pack, unpack)


def resolve_saved_activations(setting: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype for `saved_activations: auto|bf16|fp32`: auto = the compute dtype (exact; the training
    set-up turns auto into bf16 for an fp32 run only where fp32 copies would not fit, train/memory_check.py)."""
    if setting == "auto":
        return compute_dtype
    choices = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if setting not in choices:
        raise ValueError(f"saved_activations must be 'auto', 'bf16' or 'fp32', got {setting!r}")
    return choices[setting]
