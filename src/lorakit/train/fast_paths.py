"""The training fast paths, switched on per model only where they compute what the reference path computes.

Each path has a rule, proven per family by tests/test_model_families.py (one step's loss and every adapter gradient
against `fused_kernels: false`, right-padded rows of different lengths):
  - fused RMSNorm and SwiGLU MLP: the module classes of Llama-style models (kernels/rms_norm.py, kernels/swiglu.py);
  - chunked lm_head + loss: a plain frozen Linear head with nothing after it (train/loss.py, fused_head_supported);
  - padding-free batches: proven model types with no dropout active (kernels/varlen_attention.py,
    padding_free_blocker); in a bf16 run their attention rows cast to fp32 where that measured faster
    (kernels/attention_dtype.py);
  - grouped q/k/v and gate/up projections: sibling LoraLinears of one dtype (train/projection_groups.py).
`enable_fast_paths` switches them and says, one line, what is on and why anything is off.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.attention_dtype import set_attention_dtype
from ..kernels.rms_norm import fuse_rms_norms
from ..kernels.swiglu import fuse_swiglu_mlps
from ..kernels.varlen_attention import padding_free_blocker, use_varlen_attention
from .loss import fused_head_supported


def enable_fast_paths(base: nn.Module, task: str = "causal_lm", padding_free: bool = True,
                      lora_dropout: float = 0.0, attention_fp32: bool = False) -> str:
    """Swap in the fused modules the model has and, for a causal LM, padding-free batches where they are exact.
    Returns what was switched, e.g. "fast paths: 61 fused RMSNorms, 30 fused SwiGLU MLPs, padding-free batches"."""
    on, off = [], []
    norms, mlps = fuse_rms_norms(base), fuse_swiglu_mlps(base)
    on += [f"{norms} fused RMSNorms"] if norms else []
    on += [f"{mlps} fused SwiGLU MLPs"] if mlps else []
    if task == "causal_lm":
        # (a head that trains, e.g. in modules_to_save, takes the reference path at each step)
        (on if fused_head_supported(base, frozen=False) else off).append("chunked lm_head + loss")
        if padding_free:
            blocker = padding_free_blocker(base, lora_dropout)
            if blocker is None:
                use_varlen_attention(base)
                fp32 = attention_fp32 and set_attention_dtype(base, torch.float32)
                on.append("padding-free batches" + (" (attention in fp32)" if fp32 else ""))
            else:
                off.append(f"padding-free batches ({blocker})")
    return "fast paths: " + (", ".join(on) or "none") + ("; off: " + "; ".join(off) if off else "")
