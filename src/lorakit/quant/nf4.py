"""NF4 (4-bit NormalFloat) with double quantization, in plain PyTorch (CPU and GPU).

As in the QLoRA paper (Dettmers et al., 2023):
  - weights are split into blocks of 64; each block is scaled by its absmax into [-1, 1] and each
    value is stored as the index (4 bits) of the nearest of the 16 NF4 code values; two indices
    are packed per byte;
  - double quantization: the fp32 absmax constants (one per 64 weights) are centred by their
    mean and quantized to 8 bits in blocks of 256, each block keeping one fp32 scale.
Storage: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter (+ one fp32 mean per tensor).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import replace_module

# The 16 NF4 code values, as published in bitsandbytes (quantiles of N(0, 1) scaled to [-1, 1],
# with an exact zero).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
BLOCK = 64
ABSMAX_BLOCK = 256


@dataclass
class NF4Tensor:
    """A quantized tensor: packed 4-bit codes plus double-quantized block scales."""

    packed: torch.Tensor          # uint8, two codes per byte, ceil(numel / 2)
    absmax_q: torch.Tensor        # int8, one per block of 64 (centred absmax, quantized)
    absmax_scale: torch.Tensor    # fp32, one per 256 absmax values
    absmax_mean: torch.Tensor     # fp32 scalar
    shape: torch.Size
    numel: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax_q, self.absmax_scale,
                                                            self.absmax_mean))

    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes() / self.numel

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "absmax_q": self.absmax_q, "absmax_scale": self.absmax_scale,
                "absmax_mean": self.absmax_mean}


def nf4_code_from_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """The paper's construction of the NF4 values: 8 positive and 7 negative N(0,1) quantiles + 0,
    normalised to [-1, 1] (bitsandbytes' `create_normal_map`)."""
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.abs().max()).float()


def _pad_to(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-flat.numel()) % multiple
    return F.pad(flat, (0, pad)) if pad else flat


QUANTIZE_CHUNK_BLOCKS = 1 << 13  # blocks quantized at a time: fp32 temporaries of ~2 MB, whatever the matrix size


def quantize_nf4(weight: torch.Tensor) -> NF4Tensor:
    """Block-wise NF4 with double-quantized absmax. Works on any device. The weight is converted to fp32 a chunk
    of blocks at a time, so quantizing a 4096 x 14336 bf16 matrix needs ~10 MB of temporaries, not ~1 GB."""
    flat = _pad_to(weight.detach().reshape(-1), BLOCK).view(-1, BLOCK)
    absmax = torch.empty(flat.shape[0], dtype=torch.float32, device=weight.device)
    idx = torch.empty(flat.numel(), dtype=torch.uint8, device=weight.device)
    code = NF4_CODE.to(weight.device)
    midpoints = (code[1:] + code[:-1]) / 2
    for start in range(0, flat.shape[0], QUANTIZE_CHUNK_BLOCKS):
        blocks = flat[start:start + QUANTIZE_CHUNK_BLOCKS].float()
        scale = blocks.abs().amax(dim=1).clamp_min(1e-12)
        absmax[start:start + len(blocks)] = scale
        idx[start * BLOCK:(start + len(blocks)) * BLOCK] = torch.bucketize(
            blocks / scale[:, None], midpoints, out_int32=True).view(-1)
    idx = _pad_to(idx, 2)
    packed = (idx[0::2] << 4) | idx[1::2]
    # Double quantization of the scales: centre, then symmetric int8 per block of 256.
    mean = absmax.mean()
    centred = _pad_to(absmax - mean, ABSMAX_BLOCK).view(-1, ABSMAX_BLOCK)
    scale = centred.abs().amax(dim=1).clamp_min(1e-12) / 127
    absmax_q = torch.round(centred / scale[:, None]).clamp(-127, 127).to(torch.int8).view(-1)[: absmax.numel()]
    return NF4Tensor(packed, absmax_q, scale, mean.reshape(()), weight.shape, weight.numel())


def dequantize_absmax(q: NF4Tensor) -> torch.Tensor:
    q_blocks = _pad_to(q.absmax_q.float(), ABSMAX_BLOCK).view(-1, ABSMAX_BLOCK)
    return (q_blocks * q.absmax_scale[:, None]).view(-1)[: q.absmax_q.numel()] + q.absmax_mean


def _byte_table(device: torch.device) -> torch.Tensor:
    """(256, 2): the two NF4 code values a packed byte holds (high nibble first)."""
    table = _BYTE_TABLES.get(device)
    if table is None:
        code = NF4_CODE.to(device)
        table = _BYTE_TABLES[device] = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)
    return table


_BYTE_TABLES: dict[torch.device, torch.Tensor] = {}


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Back to a dense tensor of q.shape in `dtype`: each byte looks up its two code values in one gather (2.3x
    faster than unpacking the nibbles first, measured on a 8192 x 2048 matrix), then blocks scale by their absmax
    in place (fp32, then cast)."""
    values = torch.index_select(_byte_table(q.packed.device), 0, q.packed.int()).view(-1)
    blocks = values[: _padded_numel(q.numel)].view(-1, BLOCK).mul_(dequantize_absmax(q)[:, None])
    dense = blocks.view(-1)[: q.numel].view(q.shape)
    return dense if dtype == torch.float32 else dense.to(dtype)


def _padded_numel(n: int) -> int:
    return n + (-n) % BLOCK


class DenseWeightCache:
    """The dense weights of the NF4 layers that ran last, for their backward to reuse (bounded to `max_bytes`).

    A layer's forward dequantizes its weight and its backward needs the same dense weight. With gradient
    checkpointing a decoder layer's recomputed forward runs right before its backward, so keeping the last few
    dense weights (one decoder layer's) saves the backward's dequantization. Entries are keyed by module and
    checked against the packed buffer's identity and version; only forwards that build a graph fill the cache
    (never inference). Gradients are bit-identical to dequantizing again (the same deterministic computation)."""

    def __init__(self, max_bytes: int = 0):
        self.max_bytes, self.entries, self.hits, self.misses = max_bytes, {}, 0, 0

    def _key(self, module) -> tuple:
        return (module.packed.data_ptr(), module.packed._version, module.compute_dtype)

    def get(self, module, store: bool) -> torch.Tensor:
        entry = self.entries.get(id(module))
        if entry is not None and entry[0] == self._key(module):
            self.hits += 1
            self.entries[id(module)] = self.entries.pop(id(module))  # most recently used last
            return entry[1]
        self.misses += 1
        weight = module.dense_weight()
        nbytes = weight.numel() * weight.element_size()
        if store and self.max_bytes >= nbytes:
            self.entries[id(module)] = (self._key(module), weight)
            while sum(w.numel() * w.element_size() for _, w in self.entries.values()) > self.max_bytes:
                self.entries.pop(next(iter(self.entries)))  # the least recently used
        return weight

    def clear(self) -> None:
        self.entries.clear()


DENSE_WEIGHTS = DenseWeightCache()  # off (0 bytes) unless the training loop sizes it (nf4_weight_cache)
NF4_CACHE_MAX_BYTES = 512 << 20     # at most this much (8B: the two largest MLP matrices of a layer, fp32)


@contextmanager
def nf4_weight_cache(max_bytes: int):
    """Let NF4 layers keep up to `max_bytes` of dense weights for their backward while inside; emptied on exit."""
    previous, DENSE_WEIGHTS.max_bytes = DENSE_WEIGHTS.max_bytes, max_bytes
    try:
        yield DENSE_WEIGHTS
    finally:
        DENSE_WEIGHTS.max_bytes = previous
        DENSE_WEIGHTS.clear()


def layer_cache_bytes(model: nn.Module, layers: int) -> int:
    """One decoder layer's NF4 weights in their compute dtype (the model's NF4 weights / `layers`), capped at
    NF4_CACHE_MAX_BYTES: what a checkpointed layer's recompute leaves for its backward."""
    total = sum(m.in_features * m.out_features * torch.finfo(m.compute_dtype).bits // 8
                for m in model.modules() if isinstance(m, NF4Linear))
    return min(total // max(1, layers), NF4_CACHE_MAX_BYTES)


class _NF4LinearFunction(torch.autograd.Function):
    """y = x @ dequant(W)^T + b, saving the 4-bit weight (not a dense copy) for backward."""

    @staticmethod
    def forward(ctx, x, bias, module, cache):
        ctx.module = module
        return F.linear(x, DENSE_WEIGHTS.get(module, store=cache), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_out @ DENSE_WEIGHTS.get(ctx.module, store=False) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class NF4Linear(nn.Module):
    """A frozen Linear whose weight is stored as NF4 and dequantized on the fly for each forward.

    Gradients flow to the input (and so to LoRA adapters wrapped around it), never to the weight;
    backward dequantizes again instead of keeping a dense weight alive.
    """

    def __init__(self, in_features: int, out_features: int, quantized: NF4Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        for name, tensor in quantized.tensors().items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> "NF4Linear":
        return cls(linear.in_features, linear.out_features, quantize_nf4(linear.weight), linear.bias, compute_dtype)

    def quantized(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.absmax_q, self.absmax_scale, self.absmax_mean,
                         torch.Size((self.out_features, self.in_features)), self.in_features * self.out_features)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.quantized(), dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a fresh tensor; writing to it does not change the module)."""
        return self.dense_weight()

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain float nn.Linear with the dequantized weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.packed.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        # a forward that builds a graph (training) keeps its dense weight for the backward, if the cache has room
        return _NF4LinearFunction.apply(x.to(self.compute_dtype), bias, self, torch.is_grad_enabled())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, compute={self.compute_dtype}"


# nn.Linear subclasses whose forward is exactly x @ W^T + b (Falcon's skips F.linear, same result)
PLAIN_LINEAR_SUBCLASSES = ("FalconLinear",)


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear, or a subclass that computes exactly what nn.Linear does (safe to swap for NF4Linear)."""
    return type(module) is nn.Linear or (isinstance(module, nn.Linear)
                                         and type(module).__name__ in PLAIN_LINEAR_SUBCLASSES)


def quantize_model_nf4(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                       skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear (except output heads) by an NF4Linear, one layer at a time, so the
    peak memory stays near the quantized size plus one layer."""
    names = [n for n, m in model.named_modules() if is_plain_linear(m) and n.rsplit(".", 1)[-1] not in skip]
    for name in names:
        linear = model.get_submodule(name)
        replace_module(model, name, NF4Linear.from_linear(linear, compute_dtype))
        linear.weight = None  # drop the float weight now, not at the end
    return model


def requantize_linears(model: nn.Module, names: list[str]) -> float:
    """Quantize the named (merged, float) Linears back to NF4; returns the mean relative L2 error
    that this second quantization adds."""
    errors = []
    for name in names:
        linear = model.get_submodule(name)
        q = NF4Linear.from_linear(linear, compute_dtype=linear.weight.dtype)
        w = linear.weight.detach().float()
        errors.append(((q.dense_weight(torch.float32) - w).norm() / w.norm()).item())
        replace_module(model, name, q)
    return sum(errors) / max(1, len(errors))
