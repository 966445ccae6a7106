"""Models of real shape with random weights, for measuring memory and speed at scale (never quality).

    python -m lorakit.models.synthetic llama-3-8b [smollm2-360m ...]   # prints each model's directory

Each is a transformers model directory (config.json, bf16 safetensors shards with their index, and the
embedded SmolLM2 tokenizer, whose 49,152 ids fit every vocabulary here), written once under the lorakit
cache (`$XDG_CACHE_HOME/lorakit/synthetic/NAME`) and then loaded like any user's local model. The weights
are generated and written one shard at a time (~1 GB each): the whole model is never held in memory, so an
8B model (16 GB of bf16) is written on a machine with less memory than its fp32 size. Weights are N(0, 0.02)
as at initialisation, norms 1, biases 0: the forward pass is numerically sane, the text is noise.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from ..calc import ARCHITECTURES, Arch
from ..utils import atomic_path, cache_root
from .loading import load_tokenizer

SHARD_BYTES = 1 << 30
INIT_STD = 0.02


def synthetic_config(arch: Arch, tokenizer):
    """The transformers config of an architecture from calc.ARCHITECTURES (Llama, or Qwen2 for Qwen shapes)."""

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(arch.model_type)
    if config_class is None:
        raise ValueError(f"synthetic models are built as llama or qwen2, not {arch.model_type!r}")
    return config_class(hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                        num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                        num_key_value_heads=arch.kv_heads, vocab_size=arch.vocab, tie_word_embeddings=arch.tied,
                        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")


def parameter_shapes(config) -> dict[str, torch.Size]:
    """Name -> shape of every parameter the model's files hold (a tied head is stored once, as the embedding)."""

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: p.shape for name, p in model.named_parameters()}


def random_weight(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return (torch.zeros if name.endswith(".bias") else torch.ones)(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, INIT_STD, generator=generator)


def shard_plan(shapes: dict[str, torch.Size], shard_bytes: int = SHARD_BYTES) -> list[list[str]]:
    """Parameter names grouped, in order, into shards of about `shard_bytes` of bf16 each."""
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current] if current else shards


def write_synthetic_model(arch: Arch, directory: str, tokenizer=None, seed: int = 0,
                          shard_bytes: int = SHARD_BYTES) -> None:
    """Write a random-weight model of `arch`'s shape to `directory` (atomically: complete or absent), with
    `tokenizer` (default: the embedded SmolLM2's)."""
    tokenizer = tokenizer or load_tokenizer()
    config = synthetic_config(arch, tokenizer)
    shapes = parameter_shapes(config)
    shards = shard_plan(shapes, shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    with atomic_path(directory, directory=True) as tmp:
        for i, names in enumerate(tqdm(shards, desc=f"writing {os.path.basename(directory)}", unit="shard")):
            filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({name: random_weight(name, shapes[name], generator) for name in names},
                      os.path.join(tmp, filename), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, filename))
        index = {"metadata": {"total_size": sum(2 * s.numel() for s in shapes.values())}, "weight_map": weight_map}
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=1)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        open(os.path.join(tmp, ".complete"), "w").close()


def synthetic_model_dir(name: str) -> str:
    """The cached directory of the random-weight model shaped like `name` (a calc.ARCHITECTURES key), written
    on first use."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}: choose from {sorted(ARCHITECTURES)}")
    directory = os.path.join(cache_root(), "synthetic", name)
    if not os.path.isfile(os.path.join(directory, ".complete")):
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        write_synthetic_model(ARCHITECTURES[name], directory)
    return directory


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip() + f"\n\narchitectures: {', '.join(sorted(ARCHITECTURES))}")
        sys.exit(0 if len(sys.argv) > 1 else 2)
    for arg in sys.argv[1:]:
        print(synthetic_model_dir(arg))
