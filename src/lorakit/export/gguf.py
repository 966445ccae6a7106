"""GGUF files for llama.cpp: the merged model (`export_gguf`) and a LoRA adapter (`export_gguf_adapter`).

Each supported transformers family is described by a `GGUFFamily`: llama.cpp's architecture name and the
conventions llama.cpp's own converter (convert_hf_to_gguf.py) applies to it:
- Llama/Mistral q/k rows go to llama.cpp's interleaved rotary order (`permute_rotary`); Qwen2/Qwen3, Gemma
  and Phi-3 use the NEOX (half-split) layout, which is transformers' own order: no permutation.
- Gemma's RMSNorm computes x * (1 + w); llama.cpp multiplies by the stored weight, so norms are written as 1 + w.
- Gemma's output head is its token embedding (llama.cpp has no separate output tensor for it).
- Extra metadata: head_dim as key/value length; Gemma-2 soft-capping and sliding window; Phi-3's rotary
  dimensions, original context length and sliding window.
A family or setting outside these (other rope scalings, Gemma-2's query scale other than llama.cpp's) is
refused with the reason, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import gguf
import numpy as np
import torch
from torch import nn

from ..layers import LoraLayer
from ..utils import atomic_path, check_target
from ..variants.dora import DoraForm
from .gguf_tokenizer import add_tokenizer, check_tokenizer

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def _gemma2_keys(writer, config) -> None:
    for key, value in (("attn_logit_softcapping", config.attn_logit_softcapping),
                       ("final_logit_softcapping", config.final_logit_softcapping)):
        if value is not None:
            getattr(writer, f"add_{key}")(float(value))
    if config.sliding_window is not None:
        writer.add_sliding_window(int(config.sliding_window))


def _gemma2_check(config) -> str | None:
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 46-layer 27B
    expected = (config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 46
                else config.head_dim)
    if config.query_pre_attn_scalar != expected:
        return (f"llama.cpp scales Gemma-2 queries by 1/sqrt({expected}); this model's query_pre_attn_scalar is "
                f"{config.query_pre_attn_scalar}")
    return None


def _phi3_keys(writer, config) -> None:
    writer.add_rope_scaling_orig_ctx_len(int(getattr(config, "original_max_position_embeddings", None)
                                             or config.max_position_embeddings))
    writer.add_sliding_window(int(config.sliding_window or 0))  # 0: no window, as llama.cpp's converter writes


@dataclass(frozen=True)
class GGUFFamily:
    """How llama.cpp stores one transformers family (see the module docstring)."""

    arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH member, lower case)
    permute_qk: bool = False
    norm_shift: float = 0.0
    head_is_embedding: bool = False
    extra_keys: Callable[[Any, Any], None] | None = None
    check: Callable[[Any], str | None] | None = None


GGUF_FAMILIES = {
    "llama": GGUFFamily("llama", permute_qk=True),
    "mistral": GGUFFamily("llama", permute_qk=True),
    "qwen2": GGUFFamily("qwen2"),
    "qwen3": GGUFFamily("qwen3"),
    "gemma": GGUFFamily("gemma", norm_shift=1.0, head_is_embedding=True),
    "gemma2": GGUFFamily("gemma2", norm_shift=1.0, head_is_embedding=True, extra_keys=_gemma2_keys,
                         check=_gemma2_check),
    "phi3": GGUFFamily("phi3", extra_keys=_phi3_keys),
}


@dataclass(frozen=True)
class GGUFTarget:
    """A model's config with its family's conventions."""

    config: Any
    family: GGUFFamily

    @property
    def arch(self) -> str:
        return self.family.arch


def _rope(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in rope:  # per-layer-type parameters
        rope = dict(rope["full_attention"])
    legacy = getattr(config, "rope_scaling", None) or {}
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope.setdefault("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
    return rope


def gguf_target(model: nn.Module) -> GGUFTarget:
    """The model's family for GGUF export, or ValueError naming why llama.cpp's layout cannot hold it."""
    config = model.config
    family = GGUF_FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(f"GGUF export supports {sorted(GGUF_FAMILIES)}; this model is {config.model_type!r} "
                         "(export --format hf instead)")
    problem = family.check(config) if family.check else None
    rope_type = _rope(config)["rope_type"]
    if rope_type not in ("default", "linear"):
        problem = f"rope scaling {rope_type!r} is not written by lorakit's GGUF export (default and linear are)"
    if family.head_is_embedding and not getattr(config, "tie_word_embeddings", True):
        problem = f"llama.cpp's {family.arch} uses the token embedding as output head; this model's head is untied"
    if problem:
        raise ValueError(f"GGUF export cannot write this {config.model_type!r} model: {problem}")
    return GGUFTarget(config, family)


def permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF (half-split) rotary row order -> llama.cpp's interleaved order, for q/k rows."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _name_map(target: GGUFTarget):
    arch = gguf.MODEL_ARCH[target.arch.upper()]
    return gguf.get_tensor_name_map(arch, target.config.num_hidden_layers)


def _gguf_base_name(hf_name: str, name_map) -> str:
    """'model.layers.0.self_attn.q_proj' -> 'blk.0.attn_q' (llama.cpp's names)."""
    name = name_map.get_name(hf_name)
    if name is None:
        raise ValueError(f"module {hf_name!r} has no llama.cpp tensor name; GGUF adapters can map "
                         "attention (q/k/v/o), MLP (gate/up/down), token embeddings and the output head")
    return name


def _rotary_heads(gguf_name: str, target: GGUFTarget) -> int | None:
    if not target.family.permute_qk:
        return None
    config = target.config
    if gguf_name.endswith("attn_q"):
        return config.num_attention_heads
    if gguf_name.endswith("attn_k"):
        return config.num_key_value_heads or config.num_attention_heads
    return None


def _write_gguf(path: str, writer_fn, force: bool, arch: str) -> str:
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
    model = peft_model.get_base_model()
    target = gguf_target(model)
    name = adapter_name or peft_model.active_adapters[0]
    if name not in peft_model.peft_config:
        raise ValueError(f"unknown adapter {name!r}; loaded adapters: {sorted(peft_model.peft_config)}")
    name_map = _name_map(target)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and name in m.adapters]
    if not layers:
        raise ValueError(f"adapter {name!r} has no LoRA layers")
    bad = [n for n, m in layers if type(m).__name__ != "LoraLinear" or m.fan_in_fan_out]
    if bad:
        raise ValueError(f"GGUF adapters support Linear layers only; cannot map {bad[:3]}")
    if target.family.head_is_embedding and any(n.endswith("lm_head") for n, _ in layers):
        raise ValueError(f"llama.cpp's {target.arch} has no output tensor of its own (the head is the token "
                         "embedding): export the merged model instead (lorakit export --format gguf)")
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
    arr = t.detach().float().numpy()
    if arr.ndim == 1 or out_type == "f32":  # norms and biases stay f32, as llama.cpp's converter does
        return arr.astype(np.float32), None
    if out_type == "f16":
        return arr.astype(np.float16), None
    kind = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[out_type]
    if out_type == "q8_0" and arr.shape[-1] % 32:
        return arr.astype(np.float16), None
    return gguf.quants.quantize(arr, kind), kind


def _add_hyperparameters(writer, target: GGUFTarget) -> None:
    config = target.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = _rope(config)
    writer.add_name(getattr(config, "_name_or_path", "") or "lorakit export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if target.family.extra_keys:
        target.family.extra_keys(writer, config)


def export_gguf(peft_model, tokenizer, path: str, out_type: str = "f16", force: bool = False,
                pretokenizer: str | None = None) -> str:
    """Merge the adapter and write the whole model as GGUF (families in GGUF_FAMILIES), with its tokenizer.
    `pretokenizer`: llama.cpp's pre-tokenizer name, for a tokenizer its converter's table does not know."""
    if out_type not in GGUF_TYPES:
        raise ValueError(f"GGUF type must be one of {GGUF_TYPES}, got {out_type!r}")
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    target = gguf_target(base)  # refuse before merging: a refused export leaves the model as it was
    pre = check_tokenizer(tokenizer, pretokenizer)
    model = peft_model.merge_and_unload() if hasattr(peft_model, "merge_and_unload") else peft_model
    name_map = _name_map(target)
    family = target.family

    def fill(writer):
        _add_hyperparameters(writer, target)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type])
        add_tokenizer(writer, tokenizer, target.config, pre)
        skip_head = family.head_is_embedding or getattr(target.config, "tie_word_embeddings", False)
        for hf_name, tensor in model.state_dict().items():
            if (skip_head and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
                continue
            name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ValueError(f"tensor {hf_name!r} has no llama.cpp name")
            heads = _rotary_heads(name.rsplit(".", 1)[0], target)
            if heads:
                tensor = permute_rotary(tensor, heads)
            if family.norm_shift and hf_name.endswith("norm.weight"):
                tensor = tensor.float() + family.norm_shift
            data, kind = _tensor_for_gguf(tensor, out_type)
            if kind is None:
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_dtype=kind)  # byte shape -> element shape inside gguf

    return _write_gguf(path, fill, force, target.arch)
