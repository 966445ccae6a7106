"""Export for deployment: merged transformers checkpoints, and GGUF files for llama.cpp.

- `export_hf`: merge the adapter into the base and write a standard transformers directory.
- `export_gguf_adapter`: a llama.cpp LoRA adapter (general.type=adapter, adapter.type=lora,
  adapter.lora.alpha, tensors `blk.N.<name>.weight.lora_a/.lora_b`) for Llama-family models.
- `export_gguf`: the merged model as a GGUF file (f32/f16/bf16/q8_0), tokenizer and chat template
  included, loadable by llama.cpp and by transformers' GGUF loader.

llama.cpp stores Llama's q/k projection rows in an interleaved rotary order, so q/k weights (and
the B factors of their adapters) are permuted exactly as llama.cpp's converter does.
All writes go to a temp file/dir first and are renamed into place; existing outputs need force=True.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
import os

import numpy as np
import torch
from torch import nn

from .layers import LoraLayer
from .utils import atomic_path
from .variants.dora import DoraForm

# transformers model_type -> (llama.cpp architecture, q/k rows permuted as llama.cpp's LLaMA converter does).
# Qwen2 uses llama.cpp's NEOX rotary layout, which is transformers' own half-split order: no permutation.
GGUF_ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


HF_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                  "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def check_target(path: str, force: bool, kind: str) -> None:
    """Refuse to overwrite `path` unless `force`; with `force`, replace only an output of the same kind:
    a file for kind "file", a model directory (only model/tokenizer files, or empty) for kind "model_dir", a
    directory for kind "adapter_dir" (adapter files are replaced in it, other files kept).
    Anything else at `path` (a directory of other files, a file where a directory goes) is never deleted."""
    if not os.path.lexists(path):
        return
    if not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite")
    if kind == "file" and not os.path.isfile(path):
        raise FileExistsError(f"{path} is a directory, not a file from an earlier export; --force replaces only a "
                              "file: choose another output path")
    if kind == "adapter_dir" and not os.path.isdir(path):
        raise FileExistsError(f"{path} is a file, not an adapter directory; choose another --out")
    if kind == "model_dir":
        if not os.path.isdir(path):
            raise FileExistsError(f"{path} is a file, not a model directory; --force replaces only a model "
                                  "directory: choose another --out")
        other = sorted(e for e in os.listdir(path)
                       if e not in HF_MODEL_FILES and not e.startswith("model-0") and not e.startswith("."))
        if other:
            raise FileExistsError(f"{path} holds files that are not an exported model ({other[:5]}); --force "
                                  "replaces only a model directory: choose another --out")


def export_hf(peft_model, tokenizer, out_dir: str, dtype: torch.dtype | None = None, force: bool = False) -> str:
    """Merge and write `out_dir` as a transformers model directory (safetensors, config, tokenizer)."""
    check_target(out_dir, force, "model_dir")
    merged = peft_model.merge_and_unload()
    if dtype is not None:
        merged.to(dtype)
    with atomic_path(out_dir, directory=True) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


# --- GGUF -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFTarget:
    """What the writer needs of a model: its config, llama.cpp architecture, and whether q/k rows permute."""

    config: Any
    arch: str
    permute: bool


def _gguf_target(model: nn.Module) -> GGUFTarget:
    config = model.config
    if config.model_type not in GGUF_ARCHS:
        raise ValueError(f"GGUF export supports the Llama family and Qwen2 {sorted(GGUF_ARCHS)}; this "
                         f"model is {config.model_type!r} (export --format hf instead)")
    return GGUFTarget(config, *GGUF_ARCHS[config.model_type])


def permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF (half-split) rotary row order -> llama.cpp's interleaved order, for q/k rows."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _name_map(target: GGUFTarget):
    import gguf

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
    return gguf.get_tensor_name_map(arch[target.arch], target.config.num_hidden_layers)


def _gguf_base_name(hf_name: str, name_map) -> str:
    """'model.layers.0.self_attn.q_proj' -> 'blk.0.attn_q' (llama.cpp's names)."""
    name = name_map.get_name(hf_name)
    if name is None:
        raise ValueError(f"module {hf_name!r} has no llama.cpp tensor name; GGUF adapters can map "
                         "attention (q/k/v/o), MLP (gate/up/down), token embeddings and the output head")
    return name


def _rotary_heads(gguf_name: str, target: GGUFTarget) -> int | None:
    if not target.permute:
        return None
    config = target.config
    if gguf_name.endswith("attn_q"):
        return config.num_attention_heads
    if gguf_name.endswith("attn_k"):
        return config.num_key_value_heads or config.num_attention_heads
    return None


def _write_gguf(path: str, writer_fn, force: bool, arch: str = "llama") -> str:
    import gguf

    check_target(path, force, "file")
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer_fn(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
    return path


def export_gguf_adapter(peft_model, path: str, adapter_name: str | None = None, force: bool = False) -> str:
    """Write the adapter as a llama.cpp LoRA GGUF. ΔW = (alpha / r) * B @ A per tensor, as llama.cpp
    computes it; layers whose scaling differs from the file's single alpha get it folded into B."""
    import gguf

    model = peft_model.get_base_model()
    target = _gguf_target(model)
    name = adapter_name or peft_model.active_adapter
    if name not in peft_model.peft_config:
        raise ValueError(f"unknown adapter {name!r}; loaded adapters: {sorted(peft_model.peft_config)}")
    name_map = _name_map(target)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and name in m.adapters]
    if not layers:
        raise ValueError(f"adapter {name!r} has no LoRA layers")
    bad = [n for n, m in layers if type(m).__name__ != "LoraLinear" or m.fan_in_fan_out]
    if bad:
        raise ValueError(f"GGUF adapters support Linear layers only; cannot map {bad[:3]}")
    if any(isinstance(m.adapters[name].form, DoraForm) for _, m in layers):
        raise ValueError("llama.cpp adapters have no DoRA magnitudes; export the merged model instead "
                         "(lorakit export --format gguf)")
    if any(m.adapters[name].form.output_bias(m, name) is not None for _, m in layers):
        raise ValueError("llama.cpp adapters have no LoRA bias term (lora_bias=True); export the merged model "
                         "instead (lorakit export --format gguf)")
    # AdaLoRA / VeRA adapters export as their effective low-rank factors (ΔW = s·B'A').
    # One alpha for the file: alpha/r reproduces the first layer's scaling; others fold the ratio into B.
    first = layers[0][1]
    alpha = first.effective_factors(name)[2] * first.adapters[name].r

    def fill(writer):
        writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(f"lorakit adapter {name}")
        for hf_name, layer in layers:
            base = _gguf_base_name(hf_name, name_map)
            A, B, s = (t.detach().float() if torch.is_tensor(t) else t for t in layer.effective_factors(name))
            B = B * (s * layer.adapters[name].r / alpha)
            heads = _rotary_heads(base, target)
            if heads:
                B = permute_rotary(B, heads)
            writer.add_tensor(f"{base}.weight.lora_a", A.numpy().astype(np.float32))
            writer.add_tensor(f"{base}.weight.lora_b", B.numpy().astype(np.float32))

    return _write_gguf(path, fill, force, target.arch)


def _tensor_for_gguf(t: torch.Tensor, out_type: str):
    import gguf

    arr = t.detach().float().numpy()
    if arr.ndim == 1 or out_type == "f32":  # norms and biases stay f32, as llama.cpp's converter does
        return arr.astype(np.float32), None
    if out_type == "f16":
        return arr.astype(np.float16), None
    kind = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[out_type]
    if out_type == "q8_0" and arr.shape[-1] % 32:
        return arr.astype(np.float16), None
    return gguf.quants.quantize(arr, kind), kind


def export_gguf(peft_model, tokenizer, path: str, out_type: str = "f16", force: bool = False) -> str:
    """Merge the adapter and write the whole model as GGUF (Llama family), with its tokenizer."""
    import gguf

    if out_type not in GGUF_TYPES:
        raise ValueError(f"GGUF type must be one of {GGUF_TYPES}, got {out_type!r}")
    model = peft_model.merge_and_unload() if hasattr(peft_model, "merge_and_unload") else peft_model
    target = _gguf_target(model)
    config = target.config
    name_map = _name_map(target)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))

    def fill(writer):
        writer.add_name(getattr(config, "_name_or_path", "") or "lorakit export")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope_theta))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type])
        _add_tokenizer(writer, tokenizer, config)
        tied = getattr(config, "tie_word_embeddings", False)
        for hf_name, tensor in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ValueError(f"tensor {hf_name!r} has no llama.cpp name")
            heads = _rotary_heads(name.rsplit(".", 1)[0], target)
            if heads:
                tensor = permute_rotary(tensor, heads)
            data, kind = _tensor_for_gguf(tensor, out_type)
            if kind is None:
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_dtype=kind)  # byte shape -> element shape inside gguf

    return _write_gguf(path, fill, force, target.arch)


def _source_gguf_tokenizer(tokenizer) -> dict:
    """The tokenizer settings of the GGUF file the model was converted from (model_loading keeps them)."""
    from .model_loading import GGUF_TOKENIZER_FILE

    path = os.path.join(str(getattr(tokenizer, "name_or_path", "") or ""), GGUF_TOKENIZER_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _add_tokenizer(writer, tokenizer, config) -> None:
    """GPT-2-style BPE vocabulary (as SmolLM2 and Llama-3 use) with merges, special ids, chat template."""
    import gguf

    if tokenizer is None:
        raise ValueError("GGUF export needs the tokenizer (it is embedded in the file)")
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')!r}")
    vocab = model["vocab"]
    size = max(config.vocab_size, len(vocab))
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, idx in vocab.items():
        tokens[idx], types[idx] = token, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    source = _source_gguf_tokenizer(tokenizer)
    writer.add_tokenizer_model("gpt2")
    # llama.cpp splits text before BPE by this name; the source GGUF's own (SmolLM2: "smollm"), else "default"
    writer.add_tokenizer_pre(source.get("pre", "default"))
    for flag in ("add_bos_token", "add_eos_token"):
        if flag in source:
            getattr(writer, f"add_{flag}")(bool(source[flag]))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "pad_token_id"),
                      ("unk", "unk_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
