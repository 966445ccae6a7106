"""Training checkpoints: adapter, optimizer, scheduler, RNG states and step, written atomically."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from .utils import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save(output_dir: str, model, optimizer, scheduler, step: int, history: list, is_main: bool = True) -> str:
    """Write `output_dir/checkpoint.pt` (temp file + rename: a crash never leaves half a checkpoint)."""
    path = os.path.join(output_dir, CHECKPOINT_NAME)
    if not is_main:
        return path
    state = {
        "step": step,
        "trainable": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "history": history,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load(output_dir: str, model, optimizer, scheduler) -> tuple[int, list]:
    """Restore everything `save` wrote; returns (step, history)."""
    path = os.path.join(output_dir, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no {CHECKPOINT_NAME} in {output_dir}; start without --resume")
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: numpy RNG state inside
    params = dict(model.named_parameters())
    missing = sorted(set(state["trainable"]) - set(params))
    if missing:
        raise ValueError(f"--resume: checkpoint {path} does not fit this model/config (e.g. {missing[:2]})")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["history"]
