"""VeRA's shared random projections (Kopiczko et al. 2024).

One frozen pair per adapter, A (r, max d_in) and B (max d_out, r), drawn from a CPU generator
seeded with `projection_prng_key` exactly as PEFT draws them (Kaiming-uniform, A first), so an
adapter saved without its projections regenerates the same matrices in either library.
Each layer uses the top-left slice that fits its shape.
"""

from __future__ import annotations

import math

import torch


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1] (a = 0 Kaiming, as PEFT's VeRA)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections:
    """The frozen (A, B) pair one VeRA adapter shares across all its layers (not a parameter of any layer)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        self.A, self.B = A, B

    @classmethod
    def generate(cls, r: int, max_in: int, max_out: int, seed: int) -> "VeraProjections":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        A = kaiming_uniform((r, max_in), gen)
        B = kaiming_uniform((max_out, r), gen)
        return cls(A, B)

    def check_fits(self, in_features: int, out_features: int, r: int) -> None:
        if self.A.shape[1] < in_features or self.B.shape[0] < out_features or self.A.shape[0] < r:
            raise ValueError(f"VeRA projections A {tuple(self.A.shape)} / B {tuple(self.B.shape)} are too small for "
                             f"a layer with d_in={in_features}, d_out={out_features}, r={r}")

    def load(self, A: torch.Tensor, B: torch.Tensor, source: str) -> None:
        """Take projections stored in an adapter file (they must have this adapter's shapes)."""
        for name, mine, theirs in (("vera_A", self.A, A), ("vera_B", self.B, B)):
            if tuple(mine.shape) != tuple(theirs.shape):
                raise ValueError(f"{source}: {name} has shape {tuple(theirs.shape)}, this model's targets need "
                                 f"{tuple(mine.shape)}; was the adapter trained on another model?")
        self.A.copy_(A)
        self.B.copy_(B)
