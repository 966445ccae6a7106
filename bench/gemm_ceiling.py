"""The GEMM-only ceiling of a training step: the step's own matrix products, timed alone.

`GemmRecorder` is a dispatch mode that, while active, counts every operator dispatched to a kernel and records
each matrix product (mm / addmm / bmm / baddbmm) with its operands' shapes, strides and dtype. `gemm_seconds`
then runs each recorded product alone on fresh operands of the same layout, as often as the step ran it, and
returns the total: the time the step would take if it did nothing but its GEMMs, at the speed this machine's
GEMM library reaches for those shapes. A step's tokens over that time is the step's GEMM-only ceiling (no
implementation that runs these products can train faster); tokens/s over the ceiling is how close the step is.
"""

from __future__ import annotations

import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GEMMS = ("mm", "addmm", "addmm_", "bmm", "baddbmm")


def _layout(arg):
    return (tuple(arg.shape), tuple(arg.stride()), arg.dtype, arg.device.type) if isinstance(arg, torch.Tensor) \
        else arg


class GemmRecorder(TorchDispatchMode):
    """Counts operators (`total`) and matrix products (`matmuls`); `gemms` maps (op, operand layouts) -> calls."""

    def __init__(self):
        super().__init__()
        self.total = self.matmuls = 0
        self.gemms: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        name = func.overloadpacket.__name__
        if name in GEMMS:
            self.matmuls += 1
            kw = tuple(sorted((k, _layout(v)) for k, v in (kwargs or {}).items()))  # out= tensors as layouts too
            self.gemms[(name, tuple(_layout(a) for a in args), kw)] += 1
        return func(*args, **(kwargs or {}))


def _operand(layout):
    if not isinstance(layout, tuple) or len(layout) != 4 or not isinstance(layout[2], torch.dtype):
        return layout
    shape, stride, dtype, device = layout
    # the same view of a storage just large enough (transposed, sliced and expanded operands alike)
    storage = 1 + sum((size - 1) * step for size, step in zip(shape, stride)) if all(shape) else 0
    return torch.randn(storage, dtype=dtype, device=device).as_strided(shape, stride)


def _best_seconds(fn, min_seconds: float = 0.02, rounds: int = 3) -> float:
    fn()  # warm-up (and first-touch of the operands)
    best = float("inf")
    for _ in range(rounds):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / n)
    return best


def gemm_seconds(gemms: Counter) -> float:
    """Seconds the recorded products take when run alone (best of 3 per layout) times how often each ran."""
    total = 0.0
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for (name, layouts, keyword_layouts), calls in gemms.items():
        op = getattr(torch.ops.aten, name.rstrip("_"))
        operands = [_operand(layout) for layout in layouts]
        kwargs = {k: _operand(v) for k, v in keyword_layouts}

        def run(op=op, operands=operands, kwargs=kwargs):
            op(*operands, **kwargs)
            sync()

        with torch.no_grad():
            total += calls * _best_seconds(run)
    return total
