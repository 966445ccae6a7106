"""Padding-free training batches: rows laid end to end in one sequence, attention run per row.

A right-padded batch of short and long rows spends GEMM work on every padding position (~20 % of the positions
of 3-turn chat rows, ~10 % of single turns). `unpad_batch` lays the rows' real tokens end to end as one row with
position ids restarting at 0 per row (the first label of each row ignored, so no row predicts the next one's
first token); every per-token layer then computes exactly what it computed for the padded batch. Attention is
the one operator that mixes positions: the attention function registered here as `VARLEN` ("lorakit_varlen")
runs scaled-dot-product attention once per row segment with the mask-free causal kernel (what the padded batch's
rows got), and for any other call (no restarting position ids, a KV cache, soft-capping, a sliding window shorter
than a row) it is exactly transformers' `sdpa` (same function, same masks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .attention_dtype import MODULE_ATTRIBUTE

VARLEN = "lorakit_varlen"
IGNORE = -100


def unpad_batch(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                multiple: int = 1) -> dict:
    """A right-padded batch as one padding-free row: {input_ids, labels, position_ids}, each (1, real tokens).

    `multiple` > 1 rounds the row's length up to a multiple of it with a filler segment (token 0, no labels,
    positions from 0: attention keeps it to itself, so no real token's output or gradient changes). Every batch
    of varying length is then one of a few lengths: the matmul library (oneDNN) plans and caches a kernel per
    shape, and a new length per step grows that cache and fragments the heap. Measured (SmolLM2-135M, 8 rows of
    ~49 tokens, bf16, AMD EPYC AVX-512-BF16, 30 steps): peak RSS 1.53 -> 1.30 GB with a multiple of 16, the same
    step time within noise and the same losses."""
    keep = attention_mask.bool()
    labels = labels.clone()
    labels[:, 0] = IGNORE  # a row's first token is never a target (in the padded batch it is no one's next token)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    ids, labels, positions = input_ids[keep], labels[keep], positions[keep]
    extra = (-ids.numel()) % multiple
    if extra:
        ids = torch.cat([ids, ids.new_zeros(extra)])
        labels = torch.cat([labels, labels.new_full((extra,), IGNORE)])
        positions = torch.cat([positions, torch.arange(extra, device=ids.device)])
    return {"input_ids": ids[None], "labels": labels[None], "position_ids": positions[None]}


_last_segments: list = [None, None, None]  # [position-id tensor (held, so its id cannot be reused), version, lengths]


def _segments(position_ids: torch.Tensor) -> list[int] | None:
    """Row lengths of a packed (1, S) position-id row (restarts at 0), else None. Remembered for the last tensor
    asked about (every layer asks for the same one); the tensor itself is held, so a new tensor at a reused
    address can never be mistaken for it."""
    if _last_segments[0] is position_ids and _last_segments[1] == position_ids._version:
        return _last_segments[2]
    found = None
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
        if len(starts) > 1 and starts[0] == 0:
            found = [b - a for a, b in zip(starts, starts[1:] + [position_ids.shape[1]])]
    _last_segments[:] = [position_ids, position_ids._version, found]
    return found


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention interface: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out."""
    position_ids = kwargs.get("position_ids")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    segments = _segments(position_ids) if position_ids is not None else None
    if (segments is None or query.shape[2] != key.shape[2] or kwargs.get("softcap") is not None
            or not getattr(module, "is_causal", True) or (window and max(segments) > window)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    dtype = query.dtype
    compute = getattr(module, MODULE_ATTRIBUTE, None) or dtype  # fp32 where measured faster (attention_dtype.py)
    if compute != dtype:
        query, key, value = query.to(compute), key.to(compute), value.to(compute)
    outputs = [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa,
                                              dropout_p=dropout)
               for q, k, v in zip(query.split(segments, dim=2), key.split(segments, dim=2),
                                  value.split(segments, dim=2))]
    return torch.cat(outputs, dim=2).to(dtype).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make VARLEN a valid `config._attn_implementation` (idempotent): this function for attention, sdpa's masks."""
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


# Model types whose padding-free step the family tests prove equal to the padded step (loss and every adapter
# gradient, tests/test_model_families.py). Others stay on padded batches: Falcon, for one, runs its own attention
# for anything but "sdpa", so packed rows would see each other.
PROVEN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "qwen2_moe", "olmoe",
                                "gpt_neox", "opt", "gpt2"})
DROPOUT_FIELDS = ("dropout", "pdrop", "jitter_noise")  # attention_dropout, resid_pdrop, router_jitter_noise, ...
OTHER_HEADS = ("classifier_", "summary_")  # dropouts of classification heads a causal LM does not run


def active_dropout(model) -> tuple[str, float] | None:
    """A dropout the model applies while training (config field or nn.Dropout module, LoRA's own excluded), or None."""
    config = getattr(model, "config", None)
    for name, value in (config.to_dict() if config is not None else {}).items():
        if any(f in name for f in DROPOUT_FIELDS) and not name.startswith(OTHER_HEADS) \
                and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return name, float(value)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0 and "lora_dropout" not in name:
            return name, float(module.p)
    return None


def padding_free_blocker(model, lora_dropout: float = 0.0) -> str | None:
    """Why a padding-free step would not compute exactly what the padded step computes for this model, or None."""
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ("sdpa", VARLEN):
        return f"its attention is {attention!r} (padding-free batches need 'sdpa')"
    model_type = getattr(config, "model_type", None)
    if model_type not in PROVEN_MODEL_TYPES:
        return (f"model type {model_type!r} is not one whose padding-free step is proven equal to the padded step "
                f"(proven: {', '.join(sorted(PROVEN_MODEL_TYPES))})")
    dropout = active_dropout(model)
    if dropout:
        return (f"the model applies dropout while training ({dropout[0]}={dropout[1]:g}): its random masks would be "
                "drawn over other positions than in the padded batch")
    if lora_dropout:
        return (f"lora_dropout={lora_dropout:g}: its random masks would be drawn over other positions than in the "
                "padded batch (lora_dropout: 0 trains padding-free)")
    return None


def use_varlen_attention(model) -> bool:
    """Switch a transformers model that uses `sdpa` to VARLEN (same results on every call); True if switched.
    Whether its padding-free *training* step is exact is `padding_free_blocker`'s question."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    for module in model.modules():  # sub-configs (e.g. a text config inside a multimodal one) switch too
        sub = getattr(module, "config", None)
        if sub is not None and getattr(sub, "_attn_implementation", None) == "sdpa":
            sub._attn_implementation = VARLEN
    return True
