"""Mixed-adapter batches: each row equals running that row alone with its adapter; equals PEFT."""

import copy

import peft
import pytest
import torch
from conftest import copy_adapters_to_peft, randomize_adapters, tiny_llama

from lorakit import LoraConfig, get_peft_model

ROWS = ["a", "b", None, "c", "d", "a", None, "b"]


def _four_adapters():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"), "a")
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.add_adapter("c", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"], use_rslora=True))
    model.add_adapter("d", LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "embed_tokens"]))
    randomize_adapters(model, seed=0, scale=0.3)
    return model.eval()


def _single(model, name, fn):
    if name is None:
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


def _assert_rows_equal_single_runs(model, ids, rows):
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=rows).logits
        for i, name in enumerate(rows):
            alone = _single(model, name, lambda: model(input_ids=ids[i:i + 1]).logits)
            assert (mixed[i] - alone[0]).abs().max() < 1e-5, (i, name)


def test_mixed_batch_logits_equal_single_adapter_runs():
    model = _four_adapters()
    torch.manual_seed(1)
    _assert_rows_equal_single_runs(model, torch.randint(0, 128, (8, 11)), ROWS)


def _tiny_gemma3():
    """A 2-layer Gemma-3 text model: its embedding multiplies by embed_scale = sqrt(hidden_size)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              max_position_embeddings=64)
    return Gemma3ForCausalLM(config).eval()


def test_mixed_batch_on_scaled_embeddings_equals_single_adapter_runs():
    base = _tiny_gemma3()
    assert float(base.get_input_embeddings().embed_scale) == pytest.approx(32 ** 0.5)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), "a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"]))
    randomize_adapters(model, seed=3, scale=0.5)
    model.eval()
    ids = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(4))
    _assert_rows_equal_single_runs(model, ids, ["a", "b", None, "b"])


def test_mixed_batch_greedy_generation_equals_single_runs():
    model = _four_adapters()
    torch.manual_seed(2)
    prompts = torch.randint(0, 128, (8, 6))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=prompts, adapter_names=ROWS, **kw)
        outputs = {n: None for n in ROWS}
        for i, name in enumerate(ROWS):
            alone = _single(model, name, lambda: model.generate(input_ids=prompts[i:i + 1], **kw))
            assert torch.equal(mixed[i], alone[0]), (i, name)
            outputs[name] = alone[0]
    assert len({tuple(v.tolist()) for v in outputs.values()}) > 1  # the adapters really differ


def test_mixed_batch_equals_peft_adapter_names():
    base = tiny_llama()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "x")
    ours.add_adapter("y", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "x")
    theirs.add_adapter("y", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(ours, seed=0, scale=0.3)
    copy_adapters_to_peft(ours, theirs)
    ids = torch.randint(0, 128, (4, 7))
    names = ["x", "__base__", "y", "x"]
    with torch.no_grad():
        a = ours.eval()(input_ids=ids, adapter_names=[None if n == "__base__" else n for n in names]).logits
        b = theirs.eval()(input_ids=ids, adapter_names=names).logits
    assert (a - b).abs().max() < 1e-5


def test_mixed_batch_on_convolutions_equals_peft():
    from conftest import ConvNet

    torch.manual_seed(0)
    base = ConvNet().eval()
    targets = ["conv1", "conv2", "conv1d", "conv3d", "head"]
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=targets), "x")
    ours.add_adapter("y", LoraConfig(r=4, lora_alpha=2, target_modules=["conv1", "conv2"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=targets), "x")
    theirs.add_adapter("y", peft.LoraConfig(r=4, lora_alpha=2, target_modules=["conv1", "conv2"]))
    randomize_adapters(ours, seed=1, scale=0.3)
    copy_adapters_to_peft(ours, theirs)
    x = torch.randn(4, 3, 16, 16)
    names = ["y", "x", "__base__", "y"]
    with torch.no_grad():
        a = ours.eval()(x, adapter_names=[None if n == "__base__" else n for n in names])
        b = theirs.eval()(x, adapter_names=names)
        ours.set_adapter("y")
        alone = ours(x[:1])
    assert (a - b).abs().max() < 1e-5 and (a[:1] - alone).abs().max() < 1e-5


def test_stacked_factors_follow_in_place_updates():
    model = _four_adapters()
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids, adapter_names=["a", "b"]).logits
        model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["b"].weight.mul_(3)
        after = model(input_ids=ids, adapter_names=["a", "b"]).logits
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1], after[1])


def test_mixed_batch_errors():
    model = _four_adapters()
    ids = torch.randint(0, 128, (2, 5))
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]"):
        model(input_ids=ids, adapter_names=["a", "zz"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs, but "
                                         "got 3 and 2"):
        model(input_ids=ids, adapter_names=["a", "b", "c"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        model(input_ids=ids, adapter_names=["a", "b"])
