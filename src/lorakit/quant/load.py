"""Load a transformers model with its Linear layers quantized to NF4, streaming tensor by tensor.

The model is built on the meta device (no memory), its Linears are swapped for NF4Linear shells,
only then is memory allocated, and each weight in the safetensors files is read, quantized and
dropped before the next is read. Peak memory stays near the quantized model's size. The embeddings
and output head (not quantized, as in QLoRA) are kept in bf16 whatever the compute dtype.
"""

from __future__ import annotations

import functools
import glob
import json
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..hardware import release_freed_memory
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


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def safetensors_index(f) -> dict[str, dict]:
    """Name -> {dtype, shape, start, end} (absolute byte offsets) of every tensor in an open .safetensors file.

    The format (an 8-byte little-endian header length, a JSON header, the tensors' bytes) is read here instead of
    through `safetensors.safe_open` because that maps the file into memory: every page read stays resident, so
    loading one 1 GB shard added 1 GB to the process's peak. Reading each tensor straight into its destination
    keeps the loader's peak at the quantized model plus one tensor."""
    f.seek(0)
    length = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    data_start = 8 + length
    return {key: {"dtype": SAFETENSORS_DTYPES[entry["dtype"]], "shape": entry["shape"],
                  "start": data_start + entry["data_offsets"][0], "end": data_start + entry["data_offsets"][1]}
            for key, entry in header.items()}


def read_tensor(f, entry: dict, into: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor `entry` describes, read from open file `f`; into `into` (same shape) when given, directly where
    its dtype matches and is contiguous, else through one temporary."""
    tensor = into if into is not None and into.dtype == entry["dtype"] and into.is_contiguous() \
        else torch.empty(entry["shape"], dtype=entry["dtype"])
    if list(tensor.shape) != list(entry["shape"]):
        raise ValueError(f"{getattr(f, 'name', 'safetensors file')}: tensor of shape {entry['shape']} does not fit "
                         f"a destination of shape {list(tensor.shape)}")
    f.seek(entry["start"])
    nbytes = entry["end"] - entry["start"]
    if nbytes and f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != nbytes:
        raise ValueError(f"{getattr(f, 'name', 'safetensors file')}: truncated tensor data")
    if into is not None and tensor is not into:
        into.copy_(tensor)
        return into
    return tensor


def load_nf4_model(directory: str, compute_dtype: torch.dtype = torch.bfloat16):

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
        with open(path, "rb") as f:
            for key, entry in safetensors_index(f).items():
                module_name, _, pname = key.rpartition(".")
                if module_name in linears and pname == "weight":
                    q = quantize_nf4(read_tensor(f, entry))
                    module = model.get_submodule(module_name)
                    for buf, value in q.tensors().items():
                        getattr(module, buf).copy_(value)
                    del q
                    release_freed_memory()  # the temporaries' heap back to the OS, so it cannot fragment
                else:
                    target = params.get(key)
                    if target is None:
                        continue  # e.g. a tied lm_head saved anyway
                    with torch.no_grad():
                        read_tensor(f, entry, into=target.data)
                loaded.add(key)
    model.tie_weights()
    missing = [k for k, _ in model.named_parameters() if k not in loaded
               and not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing:
        raise ValueError(f"{directory}: weights missing from the files: {missing[:3]}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
