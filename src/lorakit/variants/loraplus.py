"""LoRA+ (Hayou et al., 2024): B matrices learn `loraplus_lr_ratio` times faster than A.

Parameter groups follow PEFT's `create_loraplus_optimizer`: A matrices (and other trainable
matrices) at `lr`; B matrices and 1-d parameters at `lr * ratio` (no weight decay for 1-d ones);
embedding adapters at `loraplus_lr_embedding`.
"""

from __future__ import annotations

import torch
from torch import nn


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float,
                          loraplus_lr_embedding: float = 1e-6, weight_decay: float = 0.0) -> list[dict]:
    if loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio must be > 0, got {loraplus_lr_ratio}")
    groups = {"A": [], "B": [], "B_no_decay": [], "embedding": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_embedding_" in name:
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if param.ndim > 1 else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    spec = {"A": (lr, weight_decay), "B": (lr * loraplus_lr_ratio, weight_decay),
            "B_no_decay": (lr * loraplus_lr_ratio, 0.0), "embedding": (loraplus_lr_embedding, weight_decay)}
    return [{"params": params, "lr": spec[key][0], "weight_decay": spec[key][1], "name": key}
            for key, params in groups.items() if params]


def create_loraplus_optimizer(model: nn.Module, lr: float, loraplus_lr_ratio: float,
                              loraplus_lr_embedding: float = 1e-6, weight_decay: float = 0.0,
                              optimizer_cls=torch.optim.AdamW, **kwargs) -> torch.optim.Optimizer:
    """An optimizer (AdamW by default) with LoRA+ learning rates."""
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding, weight_decay)
    return optimizer_cls(groups, lr=lr, **kwargs)
