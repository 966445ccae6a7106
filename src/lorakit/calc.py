"""Parameter and memory calculator, and rank suggestions.

LoRA on a (d_out x d_in) matrix adds r * (d_in + d_out) parameters. Whole-model figures come from
an architecture's dimensions (built-in table, a config.json, or a live model).

Memory model (stated assumptions, per parameter of the base model):
  full fine-tuning: 16-bit weights (2 B) + 16-bit gradients (2 B) + AdamW's two moments in 16 bits
                    (4 B)  = 8 B/param;
  LoRA:             16-bit frozen weights (2 B); adapters in fp32 with fp32 gradients and AdamW
                    states (16 B per adapter parameter);
  QLoRA:            NF4 double-quantized frozen weights (4.127 bits = 0.516 B) + adapters as LoRA;
  activations:      gradient checkpointing on: one 16-bit hidden state per layer per token, plus one
                    layer's full activations (~34 hidden-sized values per token, Korthikanti et al.).
With 7B parameters and 2,048 tokens this gives the familiar figures: full ~57 GB, LoRA ~15 GB.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127 bits per parameter with double quantization
GB = 1e9


@dataclass(frozen=True)
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    gated_mlp: bool = True
    nominal_params: float | None = None  # the size the model is known by, e.g. 7e9

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def matrices(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of each per-layer matrix, under the usual module names."""
        h, i = self.hidden, self.intermediate
        shapes = {"q_proj": (h, h), "k_proj": (self.kv_dim, h), "v_proj": (self.kv_dim, h), "o_proj": (h, h),
                  "up_proj": (i, h), "down_proj": (h, i)}
        if self.gated_mlp:
            shapes["gate_proj"] = (i, h)
        return shapes

    def base_params(self) -> int:
        per_layer = sum(o * i for o, i in self.matrices().values()) + 2 * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


ARCHITECTURES = {
    "llama-2-7b": Arch(4096, 11008, 32, 32, 32, 32000, nominal_params=7e9),
    "llama-2-13b": Arch(5120, 13824, 40, 40, 40, 32000, nominal_params=13e9),
    "llama-2-70b": Arch(8192, 28672, 80, 64, 8, 32000, nominal_params=70e9),
    "llama-3-8b": Arch(4096, 14336, 32, 32, 8, 128256, nominal_params=8e9),
    "llama-3-70b": Arch(8192, 28672, 80, 64, 8, 128256, nominal_params=70e9),
    "mistral-7b": Arch(4096, 14336, 32, 32, 8, 32000, nominal_params=7e9),
    "gpt-3-175b": Arch(12288, 4 * 12288, 96, 96, 96, 50257, gated_mlp=False, nominal_params=175e9),
    "smollm2-135m": Arch(576, 1536, 30, 9, 3, 49152, tied=True),
    "smollm2-360m": Arch(960, 2560, 32, 15, 5, 49152, tied=True),
    "smollm2-1.7b": Arch(2048, 8192, 24, 32, 32, 49152, tied=True),
}
ALIASES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "q": "q_proj", "k": "k_proj",
           "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def lora_params(d_out: int, d_in: int, r: int) -> int:
    """Parameters LoRA adds to one (d_out x d_in) matrix: r * (d_in + d_out).

    >>> lora_params(4096, 4096, 8)
    65536
    """
    for name, value in (("d_out", d_out), ("d_in", d_in), ("rank", r)):
        _positive(name, value)
    if r > min(d_out, d_in):
        raise ValueError(f"rank {r} is larger than the matrix's smaller dimension ({min(d_out, d_in)}) "
                         f"of a {d_out}x{d_in} matrix: a low-rank update needs r <= {min(d_out, d_in)}")
    return int(r * (d_in + d_out))


class ArchUnknown(ValueError):
    """A config.json that is not a decoder config the calculator can size."""


def get_arch(name_or_config: str) -> Arch:
    """A built-in architecture name, or a path to a transformers config.json (or its directory)."""
    if name_or_config in ARCHITECTURES:
        return ARCHITECTURES[name_or_config]
    path = os.path.join(name_or_config, "config.json") if os.path.isdir(name_or_config) else name_or_config
    if not os.path.isfile(path):
        raise ValueError(f"unknown architecture {name_or_config!r}: use one of {sorted(ARCHITECTURES)} "
                         "or a path to a config.json")
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON config file ({e})") from None
    if not isinstance(c, dict):
        raise ValueError(f"{path} must hold a JSON object (a transformers config), got {type(c).__name__}")
    try:
        heads = c["num_attention_heads"]
        arch = Arch(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], heads,
                    c.get("num_key_value_heads") or heads, c["vocab_size"], bool(c.get("tie_word_embeddings")))
    except KeyError as e:
        raise ArchUnknown(f"{path} lacks {e.args[0]!r}: not a decoder config lorakit can size") from None
    for field_name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
        value = getattr(arch, field_name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ArchUnknown(f"{path}: {field_name} must be a positive integer, got {value!r}")
    return arch


def model_lora_params(arch: Arch, targets: list[str], r: int, layers: int | None = None) -> int:
    """LoRA parameters for `targets` (module names, or LoRA-paper names Wq/Wk/Wv/Wo) in every layer."""
    shapes = arch.matrices()
    total = 0
    for target in targets:
        name = ALIASES.get(target.lower(), target)
        if name not in shapes:
            raise ValueError(f"target {target!r} is not a matrix of this architecture; choose from {sorted(shapes)}")
        total += lora_params(*shapes[name], r)
    return total * (arch.layers if layers is None else layers)


def memory_estimate(arch: Arch, targets: list[str], r: int, tokens: int = 2048) -> dict[str, dict[str, float]]:
    """GB for full fine-tuning, LoRA and QLoRA (see the module docstring for the assumptions)."""
    _positive("tokens", tokens)
    n = arch.nominal_params or arch.base_params()
    adapter = model_lora_params(arch, targets, r)
    activations = (tokens * arch.layers * arch.hidden * 2 + tokens * arch.hidden * 34 * 2) / GB
    rows = {
        "full": {"weights": n * 2 / GB, "gradients": n * 2 / GB, "optimizer": n * 4 / GB},
        "lora": {"weights": n * 2 / GB, "gradients": adapter * 4 / GB, "optimizer": adapter * 12 / GB},
        "qlora": {"weights": n * NF4_BITS / 8 / GB, "gradients": adapter * 4 / GB, "optimizer": adapter * 12 / GB},
    }
    for row in rows.values():
        row["activations"] = activations
        row["total"] = sum(row.values())
    return rows


def fits(estimate: dict[str, dict[str, float]], memory_gb: float) -> dict[str, bool]:
    _positive("memory_gb", memory_gb)
    return {method: row["total"] <= memory_gb for method, row in estimate.items()}


def suggest_rank(task_complexity: str, model_size: float) -> dict[str, int]:
    """The seed heuristic: simple -> 8; medium -> 16 (32 from 7B); complex -> 64 (128 from 7B); alpha = 2r.

    >>> suggest_rank("medium", 7e9)
    {'r': 32, 'lora_alpha': 64}
    """
    _positive("model_size", model_size)
    big = model_size >= 7e9
    table = {"simple": 8, "medium": 32 if big else 16, "complex": 128 if big else 64}
    if task_complexity not in table:
        raise ValueError(f"task_complexity must be one of {sorted(table)}, got {task_complexity!r}")
    r = table[task_complexity]
    return {"r": r, "lora_alpha": 2 * r}


def report(arch_name: str, targets: list[str], r: int, tokens: int = 2048, memory_gb: float | None = None) -> dict:
    arch = get_arch(arch_name)
    est = memory_estimate(arch, targets, r, tokens)
    out = {"architecture": arch_name, "dims": asdict(arch), "base_params": arch.base_params(),
           "targets": targets, "r": r, "lora_params": model_lora_params(arch, targets, r),
           "memory_gb": est, "tokens": tokens}
    out["trainable_percent"] = 100 * out["lora_params"] / out["base_params"]
    if memory_gb is not None:
        out["fits_in"] = {"memory_gb": memory_gb, **fits(est, memory_gb)}
    return out
