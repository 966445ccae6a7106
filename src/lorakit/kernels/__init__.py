"""Fused training kernels in plain PyTorch: each has a reference path and a gradcheck test."""

from .linear_ce import linear_cross_entropy_sum
from .lora_linear import fused_lora_linear
from .swiglu import swiglu

__all__ = ["fused_lora_linear", "linear_cross_entropy_sum", "swiglu"]
