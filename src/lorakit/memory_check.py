"""Before a run loads anything: will its frozen weights and adapter states fit in this machine's memory?

A floor, not the calculator's full estimate: the base weights at the run's storage (fp32 4 B, bf16 2 B,
NF4 4.127 bits per parameter). Adapters, optimizer states and activations come on top, so a run refused
here cannot fit; one allowed may still need gradient checkpointing or a smaller batch. (`lorakit calc`
prints the full estimate.)
"""

from __future__ import annotations

import os

from . import calc

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "nf4": calc.NF4_BITS / 8}


def available_gb() -> float | None:
    """MemAvailable from /proc/meminfo in GB (None where the system does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / calc.GB
    except OSError:
        pass
    return None


def memory_floor_gb(model_dir: str, storage: str) -> tuple[float, int]:
    """(GB the frozen weights need at least, base parameter count)."""
    arch = calc.get_arch(os.path.join(model_dir, "config.json"))
    n = arch.base_params()
    return n * BYTES_PER_PARAM[storage] / calc.GB, n


def check_fits(model_dir: str, storage: str, limit_gb: float | None) -> str:
    """A one-line summary of the floor against the memory available (or `limit_gb`); ValueError, naming what
    would fit instead, when the floor alone exceeds it."""
    floor, n = memory_floor_gb(model_dir, storage)
    available = limit_gb if limit_gb is not None else available_gb()
    summary = (f"memory: {n / 1e9:.2f} B base parameters in {storage} need at least {floor:.2f} GB"
               + (f" of {available:.1f} GB available" if available is not None else ""))
    if available is None or floor <= available:
        return summary
    options = [f"quantize: nf4 (weights {n * BYTES_PER_PARAM['nf4'] / calc.GB:.1f} GB)"] if storage != "nf4" else []
    if storage == "fp32":
        options.append(f"bf16: true (weights {n * 2 / calc.GB:.1f} GB)")
    raise ValueError(f"this run cannot fit: the frozen weights in {storage} alone need {floor:.1f} GB, "
                     f"{available:.1f} GB is available"
                     + (f"; try {' or '.join(options)}" if options else "; use a smaller model")
                     + " (set memory_check: false to start anyway)")
