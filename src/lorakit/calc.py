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

from .kernels.linear_ce import chunk_rows_for
from .utils import check_positive_int

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
    model_type: str = "llama"            # transformers' model_type (models/synthetic.py builds llama or qwen2)

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
    "llama-3.2-1b": Arch(2048, 8192, 16, 32, 8, 128256, tied=True),
    "llama-3.2-3b": Arch(3072, 8192, 28, 24, 8, 128256, tied=True),
    "qwen2.5-7b": Arch(3584, 18944, 28, 28, 4, 152064, model_type="qwen2"),
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
        try:
            check_positive_int(f"{path}: {field_name}", getattr(arch, field_name, None), allow_none=True)
        except ValueError as e:
            raise ArchUnknown(str(e)) from None
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


# The peak of one lorakit training run (predict_run), per component. Calibrated against bench/scale.py's measured
# peak RSS (random-weight models of real shape, 0.36B-8B; docs/benchmarks gives the error per size).
RUNTIME_GB = 0.45            # python, torch, transformers, the tokenizer: RSS before the model loads
# Values kept for backward per token and layer (x hidden, x kv_dim, x intermediate) on lorakit's path (fused norms
# and SwiGLU, LoRA on every linear layer): norm inputs, the normed input shared by q/k/v and by gate/up, q, k, v,
# the attention output, gate and up (the fused SwiGLU recomputes its product). Fitted to the activations measured
# without checkpointing on the 1B shape (4.70 GB: peak RSS minus the other components, qlora and lora alike; was
# (10, 2, 4) when only checkpointed runs were measured, where one layer's worth hardly shows).
SAVED_PER_TOKEN_LAYER = (6, 2, 2.75)
# A bf16 run's activations are not half an fp32 run's: attention rows cast to fp32 (attention_fp32), fp32 norm
# statistics and backward temporaries stay fp32-sized. Fitted on the 1B shape on an AVX-512-BF16 CPU (bench/
# scale_avx512bf16.json): peak RSS minus the other components left 3.58 GB (lora) and 3.33 GB (qlora) where
# 2 bytes per saved value give 2.35 GB (saved tensors counted alone: 2.68 GB).
BF16_ACTIVATION_FACTOR = 1.5
ALLOCATOR_SLACK_GB = 0.5     # freed heap the training loop lets glibc keep (TrainConfig.freed_memory_slack_gb)


@dataclass(frozen=True)
class RunShape:
    """What of a training run decides its memory: the base's storage, the compute dtype, the micro-batch,
    the adapters, checkpointing."""

    storage: str | None = None        # "nf4", or None: frozen weights in the compute dtype
    compute: str = "fp32"             # "fp32" | "bf16": base weights (unquantized), activations, embeddings
    batch: int = 8
    length: int = 256                 # tokens per row (the longest in a micro-batch)
    rank: int = 16
    targets: tuple[str, ...] | None = None  # None: every linear layer
    gradient_checkpointing: bool = False
    saved_bytes: int | None = None    # bytes per saved activation value (None: the compute dtype's, as auto)
    checkpointed_layers: int | None = None  # with gradient_checkpointing: how many layers recompute (None: all)

    def __post_init__(self):
        if self.storage not in (None, "nf4"):
            raise ValueError(f"storage must be None or 'nf4', got {self.storage!r}")
        if self.compute not in ("fp32", "bf16"):
            raise ValueError(f"compute must be 'fp32' or 'bf16', got {self.compute!r}")
        for name in ("batch", "length", "rank"):
            _positive(name, getattr(self, name))


def predict_run(arch: Arch, run: RunShape) -> dict[str, float]:
    """Predicted peak memory (GB) of a lorakit training run, by component, and its `total`.

    weights: the frozen linear layers (NF4 4.127 bits, or the compute dtype) + embeddings and an untied head in
    the compute dtype; adapters: fp32 factors + gradients + AdamW's two moments (16 B per parameter);
    activations: every layer's saved tensors (SAVED_PER_TOKEN_LAYER values per token, at `saved_bytes`; on a bf16
    run x BF16_ACTIVATION_FACTOR), except
    that a checkpointed layer keeps only its input hidden state (all checkpointed: plus one rebuilt in backward); loss: the
    final hidden state and its gradient, and the chunked cross-entropy's logits chunk (fp32, with the softmax);
    transient: the largest frozen matrix as the compute dtype (NF4 dequantized for a matmul) and the backward
    of one MLP (gradients of the intermediate activations); allocator: the freed heap the training loop lets
    glibc keep before returning it (ALLOCATOR_SLACK_GB); runtime: the process before the model loads."""
    compute = 4 if run.compute == "fp32" else 2
    saved = run.saved_bytes or compute
    shapes = arch.matrices()
    linear = arch.layers * sum(o * i for o, i in shapes.values())
    other = arch.base_params() - linear
    targets = run.targets or tuple(shapes)
    tokens = run.batch * run.length
    per_token_layer = sum(c * d for c, d in zip(SAVED_PER_TOKEN_LAYER, (arch.hidden, arch.kv_dim,
                                                                          arch.intermediate))) * saved
    if run.compute == "bf16":
        per_token_layer *= BF16_ACTIVATION_FACTOR
    one_layer = tokens * per_token_layer
    # Checkpointed layers (the first ones) keep only their input. The peak is at the end of forward (their inputs +
    # the other layers' activations) or, when every layer recomputes, during backward (their inputs + one rebuilt
    # layer): by then the layers that kept activations have finished backward and freed them.
    recomputed = checkpointed(arch, run)
    activations = recomputed * (tokens * arch.hidden * compute) \
        + max(arch.layers - recomputed, 1 if recomputed else 0) * one_layer
    largest = max(o * i for o, i in shapes.values())
    rows = {
        "runtime": RUNTIME_GB * GB,
        "allocator": ALLOCATOR_SLACK_GB * GB,
        "weights": linear * (NF4_BITS / 8 if run.storage == "nf4" else compute) + other * (
            2 if run.storage == "nf4" else compute),  # the NF4 loader keeps embeddings and head in bf16
        "adapters": model_lora_params(arch, list(targets), run.rank) * 16,
        "activations": activations,
        # the hidden states' gradient (kept from forward) + one chunk of fp32 logits and its softmax cast
        "loss": 2 * tokens * arch.hidden * compute + 2 * chunk_rows_for(arch.vocab) * arch.vocab * 4,
        "transient": largest * compute + 3 * tokens * arch.intermediate * compute,
    }
    out = {name: value / GB for name, value in rows.items()}
    out["total"] = sum(out.values())
    return out


def checkpointed(arch: Arch, run: RunShape) -> int:
    """How many of the model's layers recompute their forward in backward under `run`."""
    if not run.gradient_checkpointing:
        return 0
    return arch.layers if run.checkpointed_layers is None else min(run.checkpointed_layers, arch.layers)


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
