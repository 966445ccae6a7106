"""Load a transformers model with its Linear layers quantized to NF4, streaming tensor by tensor.

The model is built on the meta device (no memory), its Linears are swapped for NF4Linear shells,
only then is memory allocated, and each weight in the safetensors files is read, quantized and
dropped before the next is read. Peak memory stays near the quantized model's size. The embeddings
and output head (not quantized, as in QLoRA) are kept in bf16 whatever the compute dtype.
"""

from __future__ import annotations

import functools
import glob
import os

import torch
from safetensors import safe_open
from torch import nn

from ..kernels.linear_ce import sliced_linear
from ..utils import replace_module
from .nf4 import NF4Linear, is_plain_linear, quantize_nf4

SKIP = ("lm_head",)


def _rebuild_computed_buffers(model: nn.Module, names: list[str]) -> None:
    """Non-persistent buffers (e.g. rotary inv_freq) are not in the files: rebuild their modules."""
    for name in names:
        module = model.get_submodule(name)
        with torch.device("cpu"):
            try:
                fresh = type(module)(config=model.config)
            except TypeError:
                raise ValueError(f"cannot stream-load {type(model).__name__}: module {name!r} "
                                 f"({type(module).__name__}) has computed buffers; load it unquantized") from None
        replace_module(model, name, fresh)


def _narrow_embeddings(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Input embeddings and output head held in bf16 (called on the meta-device model, before any memory is
    allocated); the embedding's output, and the head's on its own forward, come out in `compute_dtype`.
    The training loss reads the head's weight directly (kernels/linear_ce.py casts it a vocabulary slice at a
    time). An 8B Llama-3's 128k-entry embedding and head: 4.2 GB in fp32, 2.1 GB in bf16."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    embedding.to(torch.bfloat16)
    embedding.register_forward_hook(lambda module, args, out: out.to(compute_dtype))
    if head is not None:
        head.to(torch.bfloat16)
        head.forward = functools.partial(sliced_linear, weight_of=head)  # logits in the compute dtype


def load_nf4_model(directory: str, compute_dtype: torch.dtype = torch.bfloat16):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    if compute_dtype != torch.bfloat16:
        _narrow_embeddings(model, compute_dtype)
    linears = {n for n, m in model.named_modules() if is_plain_linear(m) and n.rsplit(".", 1)[-1] not in SKIP}
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    for name in linears:  # meta-device shells with the right buffer shapes
        meta = model.get_submodule(name)
        replace_module(model, name, NF4Linear(meta.in_features, meta.out_features, quantize_nf4(meta.weight),
                                              meta.bias, compute_dtype))
    computed = [n for n, m in model.named_modules() if getattr(m, "_non_persistent_buffers_set", None)]
    model.to_empty(device="cpu")
    _rebuild_computed_buffers(model, computed)
    loaded, params = set(), dict(model.named_parameters())
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                module_name, _, pname = key.rpartition(".")
                if module_name in linears and pname == "weight":
                    q = quantize_nf4(f.get_tensor(key))
                    module = model.get_submodule(module_name)
                    for buf, value in q.tensors().items():
                        getattr(module, buf).copy_(value)
                else:
                    target = params.get(key)
                    if target is None:
                        continue  # e.g. a tied lm_head saved anyway
                    with torch.no_grad():
                        target.copy_(f.get_tensor(key))
                loaded.add(key)
    model.tie_weights()
    missing = [k for k, _ in model.named_parameters() if k not in loaded
               and not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing:
        raise ValueError(f"{directory}: weights missing from the files: {missing[:3]}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
