"""The optimizer and learning-rate schedule of a run: AdamW (LoRA+ groups when asked), warmup + cosine."""

from __future__ import annotations

import math

import torch

from ..adapters.model import LoraModel
from ..variants import create_loraplus_optimizer
from .config import TrainConfig


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(cfg: TrainConfig, model: LoraModel, device: torch.device, total_steps: int):
    """(optimizer, scheduler, trainable parameters): AdamW (LoRA+ groups when asked), warmup + cosine."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.loraplus_lr_ratio:
        optimizer = create_loraplus_optimizer(model, cfg.lr, cfg.loraplus_lr_ratio, weight_decay=cfg.weight_decay)
    else:
        # torch's fused AdamW (CPU and CUDA): one kernel updates every adapter tensor instead of ~10 per tensor
        # (plain tensors only: FSDP's sharded DTensors keep the default implementation)
        fused = device.type in ("cpu", "cuda") and all(type(p.data) is torch.Tensor for p in params)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))
    return optimizer, scheduler, params
