"""The model families users bring, as tiny random configs built in code (no downloads): for each, LoRA with
PEFT's default targets (`target_modules=None`) and with "all-linear" beside PEFT 0.21 — same outputs, a
training step that moves the loss, merge == unmerged, files both ways; causal LMs also serve mixed-adapter
batches and train on a 4-bit NF4 base."""

import copy

import peft
import pytest
import torch
import transformers as T
from conftest import copy_adapters_to_peft, randomize_adapters

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
    "gemma2": (_causal(T.Gemma2Config, T.Gemma2ForCausalLM, head_dim=8), "CAUSAL_LM", True, "ids"),
    "phi3": (_causal(T.Phi3Config, T.Phi3ForCausalLM, pad_token_id=0), "CAUSAL_LM", False, "ids"),
    "gpt_neox": (lambda v=96: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)),
        "CAUSAL_LM", True, "ids"),
    "opt": (lambda v=96: T.OPTForCausalLM(T.OPTConfig(
        vocab_size=v, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
        max_position_embeddings=256)), "CAUSAL_LM", True, "ids"),
    "falcon": (lambda v=96: T.FalconForCausalLM(T.FalconConfig(
        vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)), "CAUSAL_LM", True, "ids"),
    "gpt2": (lambda v=96: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=256)),
             "CAUSAL_LM", True, "ids"),
    "bert_seq_cls": (lambda v=96: T.BertForSequenceClassification(T.BertConfig(
        vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3)), "SEQ_CLS", True, "ids"),
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


def _config(lib, name, targets):
    _, task, has_default, _ = FAMILIES[name]
    if targets == "default":
        targets = None if has_default else (["q_proj", "v_proj"] if name == "vit" else "all-linear")
    kw = dict(r=4, lora_alpha=8, target_modules=targets, task_type=task)
    if name == "vit":
        kw["modules_to_save"] = ["classifier"]
    return lib.LoraConfig(**kw)


@pytest.mark.parametrize("targets", ["default", "all-linear"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_beside_peft(name, targets, tmp_path):
    if name == "roberta_token_cls" and targets == "all-linear":
        pytest.skip("PEFT 0.21 refuses this one: its all-linear takes the classifier that TOKEN_CLS puts in "
                    "modules_to_save (lorakit leaves it to modules_to_save)")
    ours = lorakit.get_peft_model(_build(name), _config(lorakit, name, targets))
    theirs = peft.get_peft_model(_build(name), _config(peft, name, targets))
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    randomize_adapters(ours, seed=3, scale=0.2)
    copy_adapters_to_peft(ours, theirs)
    inputs = _inputs(FAMILIES[name][3])
    ours.eval(), theirs.eval()
    with torch.no_grad():
        expected = _out(theirs, inputs)
        torch.testing.assert_close(_out(ours, inputs), expected, atol=1e-5, rtol=1e-4)
    # files both ways
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    with torch.no_grad():
        torch.testing.assert_close(_out(peft.PeftModel.from_pretrained(_build(name), str(tmp_path / "ours")), inputs),
                                   expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            _out(lorakit.PeftModel.from_pretrained(_build(name), str(tmp_path / "theirs")), inputs), expected,
            atol=1e-5, rtol=1e-4)
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
def test_causal_family_mixed_batches_and_nf4_base(name):
    model = lorakit.get_peft_model(_build(name), _config(lorakit, name, "all-linear"), "a")
    model.add_adapter("b", _config(lorakit, name, "all-linear"))
    randomize_adapters(model, seed=5, scale=0.2)
    model.eval()
    ids = _inputs("ids")["input_ids"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["b", "a"]).logits
        for row, adapter in enumerate(["b", "a"]):
            model.set_adapter(adapter)
            torch.testing.assert_close(mixed[row], model(input_ids=ids[row:row + 1]).logits[0], atol=1e-5, rtol=1e-4)
    # QLoRA: the frozen Linear layers in 4-bit NF4, adapters in fp32, a step trains them
    base = quantize_model_nf4(_build(name), compute_dtype=torch.float32)
    qlora = lorakit.get_peft_model(base, _config(lorakit, name, "all-linear"))
    qlora.train()
    loss = qlora(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in qlora.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", CAUSAL)
def test_fused_training_path_equals_the_reference_path(name, tiny_tokenizer):
    """The training fast path (fused norms / MLPs where the family has Llama's, chunked lm_head + loss where the
    head is a plain Linear; the rest stays on the reference path) changes nothing: one step's loss and every
    adapter gradient equal fused_kernels=false (< 1e-4 relative, fp32)."""
    from lorakit import data as D
    from lorakit.kernels.rms_norm import fuse_rms_norms
    from lorakit.kernels.swiglu import fuse_swiglu_mlps
    from lorakit.loss import CausalLMLoss
    from lorakit.train_config import DEMO_DATA

    rows, _ = D.load_examples(DEMO_DATA, tiny_tokenizer, max_length=48)
    batch = D.collate(rows[:4], tiny_tokenizer.pad_token_id)
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        base = FAMILIES[name][0](len(tiny_tokenizer)).eval()
        if fused:
            fuse_rms_norms(base)
            fuse_swiglu_mlps(base)
        model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize_adapters(model, seed=2, scale=0.1)
        loss = CausalLMLoss(model, fused=fused)(**batch)
        loss.backward()
        runs[fused] = loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    (loss_fused, grads_fused), (loss_ref, grads_ref) = runs[True], runs[False]
    assert abs(loss_fused - loss_ref) <= 1e-4 * abs(loss_ref)
    assert grads_fused.keys() == grads_ref.keys()
    for key, grad in grads_ref.items():
        scale = grad.abs().max().item() or 1.0
        assert (grads_fused[key] - grad).abs().max().item() <= 1e-4 * scale, key
