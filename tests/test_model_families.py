"""The model families users bring, as tiny random configs built in code (no downloads): for each, LoRA with
PEFT's default targets (`target_modules=None`) and with "all-linear" beside PEFT 0.21 — same outputs, a
training step that moves the loss, merge == unmerged, files both ways; causal LMs also serve mixed-adapter
batches and train on a 4-bit NF4 base."""

import copy

import peft
import pytest
import torch
import transformers as T
from conftest import assert_close_fp32, copy_adapters_to_peft, randomize_adapters

import lorakit
from lorakit.quant.nf4 import quantize_model_nf4

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _causal(config_cls, model_cls, **kw):
    return lambda v=96: model_cls(config_cls(**{**SMALL, "vocab_size": v, **kw}))


FAMILIES = {  # name: (build, task_type, PEFT has a default for target_modules, inputs kind)
    "llama": (_causal(T.LlamaConfig, T.LlamaForCausalLM), "CAUSAL_LM", True, "ids"),
    "qwen2": (_causal(T.Qwen2Config, T.Qwen2ForCausalLM), "CAUSAL_LM", True, "ids"),
    "qwen3": (_causal(T.Qwen3Config, T.Qwen3ForCausalLM, head_dim=8), "CAUSAL_LM", True, "ids"),
    "mistral": (_causal(T.MistralConfig, T.MistralForCausalLM), "CAUSAL_LM", True, "ids"),
    "gemma": (_causal(T.GemmaConfig, T.GemmaForCausalLM, head_dim=8), "CAUSAL_LM", True, "ids"),
    "gemma2": (_causal(T.Gemma2Config, T.Gemma2ForCausalLM, head_dim=8, query_pre_attn_scalar=8), "CAUSAL_LM", True, "ids"),
    "phi3": (_causal(T.Phi3Config, T.Phi3ForCausalLM, pad_token_id=0), "CAUSAL_LM", False, "ids"),
    "mixtral": (_causal(T.MixtralConfig, T.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2),
                "CAUSAL_LM", True, "ids"),
    "qwen2_moe": (_causal(T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, moe_intermediate_size=24, num_experts=4,
                          num_experts_per_tok=2, shared_expert_intermediate_size=48), "CAUSAL_LM", False, "ids"),
    "olmoe": (_causal(T.OlmoeConfig, T.OlmoeForCausalLM, num_experts=4, num_experts_per_tok=2),
              "CAUSAL_LM", False, "ids"),
    "gpt_neox": (lambda v=96: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)),
        "CAUSAL_LM", True, "ids"),
    "opt": (lambda v=96: T.OPTForCausalLM(T.OPTConfig(  # no dropout: the fast-path test trains in fp32 exactly
        vocab_size=v, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
        max_position_embeddings=256, dropout=0.0)), "CAUSAL_LM", True, "ids"),
    "falcon": (lambda v=96: T.FalconForCausalLM(T.FalconConfig(
        vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)), "CAUSAL_LM", True, "ids"),
    "gpt2": (lambda v=96: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
             "CAUSAL_LM", True, "ids"),
    "bert_seq_cls": (lambda v=96: T.BertForSequenceClassification(T.BertConfig(
        vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3)), "SEQ_CLS", True, "ids"),
    "deberta_v2_seq_cls": (lambda v=96: T.DebertaV2ForSequenceClassification(T.DebertaV2Config(
        vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3, max_position_embeddings=64)), "SEQ_CLS", True, "ids"),
    "roberta_token_cls": (lambda v=96: T.RobertaForTokenClassification(T.RobertaConfig(
        vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=5, max_position_embeddings=70)), "TOKEN_CLS", True, "ids"),
    "t5": (lambda v=96: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=v, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)),
        "SEQ_2_SEQ_LM", True, "seq2seq"),
    "bart": (lambda v=96: T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=v, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256)),
        "SEQ_2_SEQ_LM", True, "seq2seq"),
    "vit": (lambda v=96: T.ViTForImageClassification(T.ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=4)), None, False, "pixels"),
}


def _build(name):
    torch.manual_seed(0)
    return FAMILIES[name][0]().eval()


def _inputs(kind):
    gen = torch.Generator().manual_seed(1)
    if kind == "pixels":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    ids = torch.randint(3, 96, (2, 7), generator=gen)
    if kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, 96, (2, 5), generator=gen)}
    return {"input_ids": ids}


def _out(model, inputs):
    return model(**inputs).logits


# PEFT 0.21's own default-target path fails on fused-MoE models ("No `target_modules` passed but also no
# `target_parameters` found": its transformers-5 MoE conversion turns target_modules=None into an empty set before the
# defaults are filled); PEFT is given its documented default for the model_type explicitly there.
PEFT_DEFAULT_BROKEN = {"mixtral": ["q_proj", "v_proj"]}


def _config(lib, name, targets):
    _, task, has_default, _ = FAMILIES[name]
    if targets == "default":
        targets = None if has_default else (["q_proj", "v_proj"] if name == "vit" else "all-linear")
        if lib is peft and name in PEFT_DEFAULT_BROKEN:
            targets = PEFT_DEFAULT_BROKEN[name]
    kw = dict(r=4, lora_alpha=8, target_modules=targets, task_type=task)
    if name == "vit":
        kw["modules_to_save"] = ["classifier"]
    return lib.LoraConfig(**kw)


def _assert_files_load_both_ways(ours, theirs, name, inputs, expected, tmp_path):
    """Our saved adapter in PEFT and PEFT's saved adapter in lorakit, each on a fresh base, give `expected`."""
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    with torch.no_grad():
        assert_close_fp32(_out(peft.PeftModel.from_pretrained(_build(name), str(tmp_path / "ours")), inputs), expected)
        assert_close_fp32(_out(lorakit.PeftModel.from_pretrained(_build(name), str(tmp_path / "theirs")), inputs), expected)


@pytest.mark.parametrize("targets", ["default", "all-linear"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_beside_peft(name, targets, tmp_path):
    if name == "roberta_token_cls" and targets == "all-linear":
        pytest.skip("PEFT 0.21 refuses this one: its all-linear takes the classifier that TOKEN_CLS puts in "
                    "modules_to_save (lorakit leaves it to modules_to_save)")
    ours = lorakit.get_peft_model(_build(name), _config(lorakit, name, targets))
    theirs = peft.get_peft_model(_build(name), _config(peft, name, targets))
    ours_cfg, theirs_cfg = ours.peft_config["default"], theirs.peft_config["default"]
    assert sorted(ours_cfg.target_modules) == sorted(theirs_cfg.target_modules)
    assert sorted(ours_cfg.target_parameters or []) == sorted(theirs_cfg.target_parameters or [])  # MoE rewrite
    assert (ours_cfg.rank_pattern, ours_cfg.alpha_pattern) == (theirs_cfg.rank_pattern, theirs_cfg.alpha_pattern)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    randomize_adapters(ours, seed=3, scale=0.2)
    copy_adapters_to_peft(ours, theirs)
    inputs = _inputs(FAMILIES[name][3])
    ours.eval(), theirs.eval()
    with torch.no_grad():
        expected = _out(theirs, inputs)
        assert_close_fp32(_out(ours, inputs), expected)
    _assert_files_load_both_ways(ours, theirs, name, inputs, expected, tmp_path)
    # training steps move the adapters (finite gradients on every one) and lower the loss
    ours.eval()  # the base models' own dropout off, so the loss is a function of the adapters only
    params = [p for p in ours.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    target = torch.randn(expected.shape, generator=torch.Generator().manual_seed(9))
    losses = []
    for _ in range(3):
        loss = (_out(ours, inputs).float() - target).square().mean()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # merge == unmerged
    ours.eval()
    with torch.no_grad():
        unmerged = _out(ours, inputs)
        merged = _out(copy.deepcopy(ours).merge_and_unload(), inputs)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)


CAUSAL = [n for n, (_, task, _, _) in FAMILIES.items() if task == "CAUSAL_LM"]


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_family_mixed_batches(name, record_property):
    model = lorakit.get_peft_model(_build(name), _config(lorakit, name, "all-linear"), "a")
    model.add_adapter("b", _config(lorakit, name, "all-linear"))
    randomize_adapters(model, seed=5, scale=0.2)
    model.eval()
    ids = _inputs("ids")["input_ids"]
    if model.peft_config["a"].target_parameters:  # all-linear on fused MoE takes the experts as parameters
        with pytest.raises(TypeError, match="mixed adapter batches") as refusal:
            model(input_ids=ids, adapter_names=["b", "a"])
        record_property("refused", str(refusal.value) + " (all-linear includes the fused experts here)")
        return
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["b", "a"]).logits
        for row, adapter in enumerate(["b", "a"]):
            model.set_adapter(adapter)
            assert_close_fp32(mixed[row], model(input_ids=ids[row:row + 1]).logits[0])


HEADS = ("lm_head", "classifier", "score")  # output heads stay unquantized (classifier heads train whole)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_nf4_base(name, record_property):
    """QLoRA: every nn.Linear but the head in 4-bit NF4, adapters in fp32. Outputs and one step's adapter
    gradients equal the same adapters on a base holding the dequantized weights (the reference)."""
    base = _build(name)
    quantized = quantize_model_nf4(copy.deepcopy(base), compute_dtype=torch.float32, skip=HEADS)
    names = [n for n, m in quantized.named_modules() if type(m).__name__ == "NF4Linear"]
    if not names:
        assert name == "gpt2"
        record_property("refused", "no nn.Linear layers to quantize (transformers' Conv1D projections)")
        return
    with torch.no_grad():
        for n in names:
            base.get_submodule(n).weight.copy_(quantized.get_submodule(n).dense_weight(torch.float32))
    inputs = _inputs(FAMILIES[name][3])
    results = []
    for model in (quantized, base):
        peft_model = lorakit.get_peft_model(model, _config(lorakit, name, "all-linear"))
        randomize_adapters(peft_model, seed=6, scale=0.2)
        peft_model.eval()
        out = _out(peft_model, inputs)
        out.float().square().mean().backward()
        results.append((out.detach(), {k: p.grad for k, p in peft_model.named_parameters() if p.requires_grad}))
    (out_q, grads_q), (out_r, grads_r) = results
    assert_close_fp32(out_q, out_r)
    assert grads_q.keys() == grads_r.keys() and grads_q
    for key, grad in grads_r.items():
        assert_close_fp32(grads_q[key], grad)


@pytest.mark.parametrize("name", CAUSAL)
def test_fused_training_path_equals_the_reference_path(name, tiny_tokenizer):
    """The training fast path with the defaults (train/fast_paths.py: fused norms / MLPs where the family has
    Llama's, chunked lm_head + loss where the head is a plain Linear, padding-free batches where proven, q/k/v and
    gate/up grouped into one matmul; the rest stays on the reference path), on right-padded rows of different
    lengths, changes nothing: one step's loss and every adapter gradient equal fused_kernels=false (< 1e-5
    relative, fp32). Where padding-free batches stay off, the set-up line says why."""
    from lorakit.kernels.varlen_attention import PROVEN_MODEL_TYPES, VARLEN
    from lorakit.train import data as D
    from lorakit.train.config import DEMO_DATA
    from lorakit.train.fast_paths import enable_fast_paths
    from lorakit.train.loss import CausalLMLoss
    from lorakit.train.projection_groups import grouped_projections

    rows, _ = D.load_examples(DEMO_DATA, tiny_tokenizer, max_length=160)
    rows = sorted(rows, key=lambda r: len(r.input_ids))[::len(rows) // 4][:4]  # four different lengths
    batch = D.collate(rows, tiny_tokenizer.pad_token_id)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 4
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        base = FAMILIES[name][0](len(tiny_tokenizer)).eval()
        if fused:
            line = enable_fast_paths(base, "causal_lm", padding_free=True, lora_dropout=0.0)
            padding_free = base.config._attn_implementation == VARLEN
            assert padding_free == (base.config.model_type in PROVEN_MODEL_TYPES
                                    and FAMILIES[name][0]().config._attn_implementation == "sdpa"), line
            assert padding_free or name in ("gemma2", "falcon"), line  # gemma2: eager attention; falcon: its own
            assert ("padding-free batches (" in line) != padding_free, line  # off: the reason is in the line
        model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize_adapters(model, seed=2, scale=0.1)
        with grouped_projections(model, enabled=fused):
            loss = CausalLMLoss(model, fused=fused)(**batch)
            loss.backward()
        runs[fused] = loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    (loss_fused, grads_fused), (loss_ref, grads_ref) = runs[True], runs[False]
    assert abs(loss_fused - loss_ref) <= 1e-5 * abs(loss_ref)
    assert grads_fused.keys() == grads_ref.keys()
    for key, grad in grads_ref.items():
        scale = grad.abs().max().item() or 1.0
        assert (grads_fused[key] - grad).abs().max().item() <= 1e-5 * scale, key


def test_padding_free_is_proven_only_for_tested_families_and_refused_with_dropout():
    """Every model type on the padding-free list is a family tested above; dropout (the model's or LoRA's) keeps
    padded batches, since its random masks would fall on other positions."""
    from lorakit.kernels.varlen_attention import PROVEN_MODEL_TYPES, padding_free_blocker

    tested = {_build(n).config.model_type for n in CAUSAL}
    assert PROVEN_MODEL_TYPES <= tested
    assert padding_free_blocker(_build("llama")) is None
    assert "lora_dropout=0.05" in padding_free_blocker(_build("llama"), lora_dropout=0.05)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4))  # GPT-2's default dropout
    assert "dropout" in padding_free_blocker(gpt2)
    assert "'falcon'" in padding_free_blocker(_build("falcon"))


# transformers' GGUF reader does not read these families' head_dim / query_pre_attn_scalar from the file (llama.cpp
# does: key_length, and its Gemma-2 scale rule); the reload is given the model's config, and the keys are checked.
GGUF_RELOAD_WITH_CONFIG = ("qwen3", "gemma2")


def _gguf_tensors(path):
    import gguf

    return {t.name: torch.from_numpy(t.data.copy()).reshape(tuple(reversed(t.shape.tolist())))
            for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_family_gguf_export(name, tiny_tokenizer, tmp_path, record_property):
    """The merged model as GGUF, reloaded by transformers' GGUF loader with the same logits (< 1e-4 of the
    largest, f32); Gemma (which that loader cannot read) checked tensor by tensor in llama.cpp's layout
    (norms stored as 1 + w, no separate head); families llama.cpp's export does not cover are refused with a
    reason and no file. The same files run in llama.cpp itself: test_export.py's optional llama.cpp tests."""
    import gguf
    from transformers import AutoModelForCausalLM

    from lorakit import export

    torch.manual_seed(0)
    base = FAMILIES[name][0](len(tiny_tokenizer)).eval()
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model, seed=4, scale=0.1)
    ids = torch.randint(3, len(tiny_tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    path = tmp_path / f"{name}.gguf"
    if name not in export.GGUF_FAMILIES:
        with pytest.raises(ValueError, match="GGUF export supports") as refusal:
            export.export_gguf(model, tiny_tokenizer, str(path), "f32", pretokenizer="gpt-2")
        assert not path.exists()
        record_property("refused", str(refusal.value).split(";")[0])  # the reason, without the model's name
        return
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export.export_gguf(model, tiny_tokenizer, str(path), "f32", pretokenizer="gpt-2")
    fields = gguf.GGUFReader(str(path)).fields
    arch = export.GGUF_FAMILIES[name].arch
    assert fields["general.architecture"].contents() == arch
    head_dim = getattr(base.config, "head_dim", None) or base.config.hidden_size // base.config.num_attention_heads
    assert fields[f"{arch}.attention.key_length"].contents() == head_dim
    if name == "gemma":
        merged = {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}  # base: merged in place
        tensors = _gguf_tensors(path)
        assert len(tensors) == len(merged) and "output.weight" not in tensors
        layer0 = base.model.layers[0]
        pairs = {"token_embd.weight": base.model.embed_tokens.weight,
                 "output_norm.weight": base.model.norm.weight + 1,
                 "blk.0.attn_norm.weight": layer0.input_layernorm.weight + 1,
                 "blk.0.ffn_norm.weight": layer0.post_attention_layernorm.weight + 1,
                 "blk.0.attn_q.weight": layer0.self_attn.q_proj.weight,  # merged: base + scaling * B @ A
                 "blk.0.ffn_down.weight": layer0.mlp.down_proj.weight}
        for gguf_name, want in pairs.items():
            assert torch.allclose(tensors[gguf_name], want.detach().float(), atol=1e-6), gguf_name
        return
    kw = {"config": base.config} if name in GGUF_RELOAD_WITH_CONFIG else {}
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, **kw).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits.float()
    assert (got - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_family_gguf_adapter(name, tiny_tokenizer, tmp_path, record_property):
    """The adapter as a llama.cpp LoRA GGUF: one lora_a/lora_b pair per LoRA layer, named after a tensor of the
    same family's merged GGUF (what llama.cpp applies it to), and alpha/r * B @ A (back in transformers' row
    order) equal to the merged-weight difference (< 1e-5)."""
    import gguf

    from lorakit import export
    from lorakit.layers import LoraLayer

    torch.manual_seed(0)
    base = FAMILIES[name][0](len(tiny_tokenizer)).eval()
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            rank_pattern={"o_proj": 2}))
    randomize_adapters(model, seed=4, scale=0.1)
    path = tmp_path / f"{name}-adapter.gguf"
    if name not in export.GGUF_FAMILIES:
        with pytest.raises(ValueError, match="GGUF export supports") as refusal:
            export.export_gguf_adapter(model, str(path))
        assert not path.exists()
        record_property("refused", str(refusal.value).split(";")[0])
        return
    export.export_gguf_adapter(model, str(path))
    reader = gguf.GGUFReader(str(path))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = _gguf_tensors(path)
    layers = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    assert len(tensors) == 2 * len(layers)
    export.export_gguf(copy.deepcopy(model), tiny_tokenizer, str(tmp_path / "merged.gguf"), "f32", pretokenizer="gpt-2")
    merged_names = set(_gguf_tensors(tmp_path / "merged.gguf"))
    family, config = export.GGUF_FAMILIES[name], base.config
    for hf_name, layer in layers.items():
        block, short = hf_name.split(".")[2], hf_name.rsplit(".", 1)[1]
        stem = next(k[:-len(".lora_a")] for k in tensors if k.startswith(f"blk.{block}.") and k.endswith(".lora_a")
                    and tensors[k].shape == layer.lora_A["default"].weight.shape
                    and torch.equal(tensors[k], layer.lora_A["default"].weight.detach().float()))
        assert stem in merged_names, stem
        a, b = tensors[f"{stem}.lora_a"], tensors[f"{stem}.lora_b"]
        delta = alpha / a.shape[0] * (b @ a)
        if family.permute_qk and short in ("q_proj", "k_proj"):
            heads = config.num_attention_heads if short == "q_proj" else config.num_key_value_heads
            delta = delta[torch.argsort(export.permute_rotary(torch.arange(delta.shape[0]), heads))]
        before = layer.base_layer.weight.detach().clone()
        layer.merge(["default"])
        merged_diff = layer.base_layer.weight.detach() - before
        layer.unmerge()
        assert (delta - merged_diff).abs().max() < 1e-5, hf_name


def test_docs_matrix_has_a_row_per_family_and_a_column_per_operation():
    """The docs' table (docs/reference/model-families.md) comes from `python tests/family_matrix.py`; a family or
    column added since must be regenerated there."""
    from family_matrix import COLUMNS, DOCS_PAGE, END, START

    page = open(DOCS_PAGE, encoding="utf-8").read()
    table = page.split(START, 1)[1].split(END, 1)[0].strip().splitlines()
    assert table[0] == "| family | " + " | ".join(COLUMNS) + " |"
    rows = [line.split("|")[1].strip() for line in table[2:] if line.startswith("| ")]
    assert rows == list(FAMILIES)


MOE = [n for n in FAMILIES if n in ("mixtral", "qwen2_moe", "olmoe")]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _expert_config(lib, **kw):
    return lib.LoraConfig(**{**dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS), **kw})


def _routers(model):
    return {n: p for n, p in model.named_parameters() if ".mlp.gate." in n}


@pytest.mark.parametrize("name", MOE)
def test_moe_experts_beside_peft(name, tmp_path):
    """LoRA on experts stored as 3-D parameters (`target_parameters`, PEFT's ParamWrapper): PEFT's parameter names
    and counts; with the same adapter weights the same logits (which differ from the base's); one backward's
    adapter gradients equal PEFT's; training moves the adapters and lowers the loss with the router and experts
    frozen; merge == unmerged; files both ways."""
    inputs = _inputs("ids")
    base_logits = _out(_build(name), inputs).detach()
    ours = lorakit.get_peft_model(_build(name), _expert_config(lorakit))
    theirs = peft.get_peft_model(_build(name), _expert_config(peft))
    ours_names = {n: tuple(p.shape) for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_names == {n: tuple(p.shape) for n, p in theirs.named_parameters() if p.requires_grad}
    assert any("experts.base_layer.lora_A" in n for n in ours_names)  # nested: gate_up_proj inside down_proj's
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    randomize_adapters(ours, seed=3, scale=0.2)
    copy_adapters_to_peft(ours, theirs)
    ours.eval(), theirs.eval()
    expected = _out(theirs, inputs)
    got = _out(ours, inputs)
    assert_close_fp32(got, expected)
    assert (got - base_logits).abs().max() > 1e-3  # the expert adapters act
    got.square().mean().backward()
    expected.square().mean().backward()
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert_close_fp32(p.grad, theirs_grads[n])
    ours.zero_grad()
    _assert_files_load_both_ways(ours, theirs, name, inputs, expected, tmp_path)
    routers = {n: p.detach().clone() for n, p in _routers(ours).items()}
    experts = {n: p.detach().clone() for n, p in ours.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))
               and "lora" not in n}
    assert routers and experts and not any(p.requires_grad for p in _routers(ours).values())
    params = [p for p in ours.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    target = torch.randn(expected.shape, generator=torch.Generator().manual_seed(9))
    losses = []
    for _ in range(3):
        loss = (_out(ours, inputs) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(p, routers[n]) for n, p in _routers(ours).items())
    assert all(torch.equal(ours.get_parameter(n), w) for n, w in experts.items())
    with pytest.raises(ValueError, match="target_parameters"):
        ours.add_weighted_adapter(["default"], [1.0], "sum", combination_type="cat")
    for bad, match in (({"lora_dropout": 0.1}, "lora_dropout"), ({"use_dora": True}, "use_dora=True"),
                       ({"target_parameters": ["mlp.experts.nothing"], "target_modules": []},
                        "no `target_parameters` found")):
        with pytest.raises(ValueError, match=match):
            lorakit.get_peft_model(_build(name), _expert_config(lorakit, **bad))
    with pytest.warns(RuntimeWarning, match="no parameter was matched"):  # module targets remain: PEFT warns
        lorakit.get_peft_model(_build(name), _expert_config(lorakit, target_parameters=["mlp.experts.nothing"]))
    with torch.no_grad():
        unmerged = _out(ours, inputs)
        merged_model = copy.deepcopy(ours).merge_and_unload()
        merged = _out(merged_model, inputs)
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    assert_close_fp32(merged, unmerged)


def test_moe_old_expert_names_become_parameters_as_in_peft():
    """PEFT 0.21's transformers-5 rewrite: Mixtral's old expert names w1 + w3 (fused into gate_up_proj) give that
    parameter rank 2r and alpha 2·alpha; naming only one of a fused pair is refused, as in PEFT."""
    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj", "w1", "w3", "w2"])
    ours = lorakit.get_peft_model(_build("mixtral"), lorakit.LoraConfig(**kw))
    theirs = peft.get_peft_model(_build("mixtral"), peft.LoraConfig(**kw))
    for cfg in (ours.peft_config["default"], theirs.peft_config["default"]):
        assert sorted(cfg.target_parameters) == ["down_proj", "gate_up_proj"] and sorted(cfg.target_modules) == ["q_proj"]
        assert cfg.rank_pattern == {r".*\.gate_up_proj": 4} and cfg.alpha_pattern == {r".*\.gate_up_proj": 8}
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for lib in (lorakit, peft):
        with pytest.raises(ValueError, match="without also targeting w3"):
            lib.get_peft_model(_build("mixtral"), lib.LoraConfig(r=2, target_modules=["w1"]))


def test_moe_transformers4_adapter_file_loads_as_in_peft(tmp_path):
    """An adapter file written for transformers 4's per-expert Linear layers (Mixtral: block_sparse_moe.experts.N.
    w1/w2/w3, plus the router and q_proj) loads into the fused 3-D experts as PEFT 0.21 loads it: same logits, and
    expert e's ΔW of gate_up_proj equals [s·B_w1 A_w1; s·B_w3 A_w3] (down_proj: s·B_w2 A_w2)."""
    import json

    from safetensors.torch import save_file

    hidden, ffn, experts, r = 32, 64, 4, 2
    gen = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(2):
        block = f"base_model.model.model.layers.{layer}"
        for name, (d_in, d_out) in {"self_attn.q_proj": (hidden, hidden), "block_sparse_moe.gate": (hidden, experts)}.items():
            state[f"{block}.{name}.lora_A.weight"] = torch.randn(r, d_in, generator=gen) * 0.1
            state[f"{block}.{name}.lora_B.weight"] = torch.randn(d_out, r, generator=gen) * 0.1
        for e in range(experts):
            for w, (d_in, d_out) in {"w1": (hidden, ffn), "w3": (hidden, ffn), "w2": (ffn, hidden)}.items():
                key = f"{block}.block_sparse_moe.experts.{e}.{w}"
                state[f"{key}.lora_A.weight"] = torch.randn(r, d_in, generator=gen) * 0.1
                state[f"{key}.lora_B.weight"] = torch.randn(d_out, r, generator=gen) * 0.1
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=r, lora_alpha=4, task_type="CAUSAL_LM", target_modules=["q_proj", "gate", "w1", "w2", "w3"])))
    inputs = _inputs("ids")
    theirs = peft.PeftModel.from_pretrained(_build("mixtral"), str(tmp_path))
    ours = lorakit.PeftModel.from_pretrained(_build("mixtral"), str(tmp_path))
    for cfg in (ours.peft_config["default"], theirs.peft_config["default"]):
        assert sorted(cfg.target_parameters) == ["down_proj", "gate.weight", "gate_up_proj"]
    with torch.no_grad():
        expected = _out(theirs, inputs)
        assert_close_fp32(_out(ours, inputs), expected)
        assert (expected - _out(_build("mixtral"), inputs)).abs().max() > 1e-3
    outer = ours.get_base_model().model.layers[0].mlp.experts
    scale = 4 / r
    for e in range(experts):
        def delta(w):
            key = f"base_model.model.model.layers.0.block_sparse_moe.experts.{e}.{w}"
            return scale * state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]
        assert torch.allclose(outer.base_layer.delta_weight("default")[e], torch.cat([delta("w1"), delta("w3")]),
                              atol=1e-6)
        assert torch.allclose(outer.delta_weight("default")[e], delta("w2"), atol=1e-6)
