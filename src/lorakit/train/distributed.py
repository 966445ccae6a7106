"""Process-group plumbing for torchrun: DDP (gloo on CPU, nccl on GPU) or FSDP; a no-op alone."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from ..hardware import resolve_device_type


@dataclass
class Env:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False


def setup(device: str = "auto") -> Env:
    """The process's rank, world size and device ("auto": the GPU when one is visible, else the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = resolve_device_type(device) == "cuda"
    if world == 1:
        return Env(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    initialized_here = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        initialized_here = True
    return Env(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device,
               initialized_here=initialized_here)


def teardown(env: Env) -> None:
    if env.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def leave_together(env: Env) -> None:
    """Wait for every rank (after a successful run): a rank that shuts gloo down while another still saves
    was seen to abort at exit ("terminate called without an active exception")."""
    if env.world_size > 1 and dist.is_initialized():
        dist.barrier()


def wrap(model: torch.nn.Module, env: Env, kind: str) -> torch.nn.Module:
    """The module the loop calls: the model itself, or its DDP / FSDP wrapper."""
    if env.world_size == 1:
        return model
    if kind == "fsdp":
        # FSDP2 (per-parameter sharding) works on CPU with gloo too, and mixes frozen base weights
        # with trainable adapters without flattening them together.
        return fully_shard(model)
    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def all_reduce_sum(value: float | int, env: Env) -> float:
    if env.world_size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.item()


def no_sync_unless_last(engine, last: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if not last and hasattr(engine, "no_sync"):
        return engine.no_sync()
    return contextlib.nullcontext()



def gather_objects(value, env: Env) -> list:
    """Every rank's `value`, in rank order (every rank must call this)."""
    if env.world_size == 1:
        return [value]
    out = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out
