"""The tokenizer inside an exported GGUF file: a GPT-2-style BPE vocabulary with merges, token types, special ids,
chat template, the pre-tokenizer name llama.cpp splits text by before BPE (the source GGUF's own for a model
converted from one, so it keeps tokenizing as it did there; else found as llama.cpp's converter finds it,
pretokenizer.py) and the source's BOS/EOS flags."""

from __future__ import annotations

import json
import os

import gguf

from ..models.loading import GGUF_TOKENIZER_FILE
from .pretokenizer import pretokenizer_name


def _source_gguf_tokenizer(tokenizer) -> dict:
    """The tokenizer settings of the GGUF file the model was converted from (models/loading.py keeps them)."""
    path = os.path.join(str(getattr(tokenizer, "name_or_path", "") or ""), GGUF_TOKENIZER_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def check_tokenizer(tokenizer, pretokenizer: str | None = None) -> str:
    """Refuse a tokenizer the export cannot write (before anything is merged or written); returns the
    pre-tokenizer name llama.cpp will split text by (see pretokenizer.py)."""
    if tokenizer is None:
        raise ValueError("GGUF export needs the tokenizer (it is embedded in the file)")
    kind = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("type")
    if kind != "BPE":
        raise ValueError(f"GGUF export supports BPE tokenizers; this one is {kind!r}")
    return pretokenizer_name(tokenizer, _source_gguf_tokenizer(tokenizer).get("pre"), pretokenizer)


def add_tokenizer(writer, tokenizer, config, pretokenizer: str) -> None:
    """GPT-2-style BPE vocabulary (as SmolLM2 and Llama-3 use) with merges, special ids, chat template;
    `pretokenizer` from check_tokenizer."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data["model"]
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
    writer.add_tokenizer_pre(pretokenizer)  # llama.cpp splits text by this name before BPE
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
