"""Training checkpoints: adapter, optimizer, scheduler, RNG states and step, written atomically."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from ..utils import atomic_path
from . import distributed as dist_utils

CHECKPOINT_NAME = "checkpoint.pt"


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save(output_dir: str, model, optimizer, scheduler, step: int, history: list, env, extra: dict | None = None) -> str:
    """Write `output_dir/checkpoint.pt` (temp file + rename: a crash never leaves half a checkpoint).
    Every rank calls this: each rank's RNG state (its dropout stream) is kept, rank 0 writes. `extra`: the method's
    own state (GRPO's rollouts in use)."""
    path = os.path.join(output_dir, CHECKPOINT_NAME)
    rng = dist_utils.gather_objects(rng_state(), env)
    if env.rank != 0:
        return path
    state = {
        "step": step,
        "trainable": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng[0],
        "rng_per_rank": rng,
        "history": history,
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load(output_dir: str, model, optimizer, scheduler, rank: int = 0) -> tuple[int, list, dict]:
    """Restore everything `save` wrote (this rank's RNG state); returns (step, history, extra)."""
    path = os.path.join(output_dir, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        finished = os.path.isfile(os.path.join(output_dir, "adapter", "adapter_config.json"))
        hint = (f"the run in {output_dir} finished (its adapter is in {os.path.join(output_dir, 'adapter')}); "
                "raise max_steps and start without --resume to train a new one" if finished
                else "start without --resume")
        raise FileNotFoundError(f"--resume: no {CHECKPOINT_NAME} in {output_dir}; {hint}")
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: numpy RNG state inside
    params = dict(model.named_parameters())
    missing = sorted(set(state["trainable"]) - set(params))
    if missing:
        raise ValueError(f"--resume: checkpoint {path} does not fit this model/config (e.g. {missing[:2]})")
    for name, value in state["trainable"].items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(f"--resume: checkpoint {path} was written with other adapter settings: {name} has shape "
                             f"{tuple(value.shape)} there, {tuple(params[name].shape)} in this run (e.g. lora.r "
                             f"changed); resume with the settings in {os.path.join(output_dir, 'config.yaml')}")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    if rank >= len(per_rank):
        raise ValueError(f"--resume: checkpoint {path} was written by {len(per_rank)} process(es); resume it with "
                         f"the same number (this is rank {rank})")
    rng = per_rank[rank]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"], state["history"], state.get("extra", {})


def remove(output_dir: str) -> None:
    """Delete the checkpoint of a finished run (so --resume cannot silently retrain from it)."""
    path = os.path.join(output_dir, CHECKPOINT_NAME)
    if os.path.isfile(path):
        os.remove(path)
