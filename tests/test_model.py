"""LoraModel behaviour: merging, disabling, unloading, adapters lifecycle, generation."""


import pytest
import torch
from conftest import ConvNet, randomize_adapters, tiny_gpt2, tiny_llama

import lorakit
from lorakit import LoraConfig, get_peft_model

ALL_TYPES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
    "convnet": (lambda: ConvNet().eval(), ["conv1", "conv2", "conv1d", "conv3d", "head"]),
}


def _build(kind, **kwargs):
    build, targets = ALL_TYPES[kind]
    torch.manual_seed(0)
    base = build()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kwargs))
    randomize_adapters(model)
    torch.manual_seed(5)
    x = torch.randn(2, 3, 16, 16) if kind == "convnet" else torch.randint(0, 128, (2, 9))
    run = (lambda: model(x)) if kind == "convnet" else (lambda: model(input_ids=x).logits)
    return model, run


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("kind", list(ALL_TYPES))
def test_merged_equals_unmerged_for_all_layer_types(kind):
    model, run = _build(kind)
    with torch.no_grad():
        unmerged = run()
        model.merge_adapter()
        merged = run()
    assert (merged - unmerged).abs().max() < 1e-5


@pytest.mark.parametrize("kind", list(ALL_TYPES))
def test_merge_then_unmerge_restores_base_weights(kind):
    model, _ = _build(kind)
    before = _base_weights(model)
    model.merge_adapter()
    assert any((p - before[n]).abs().max() > 1e-4 for n, p in _base_weights(model).items())
    model.unmerge_adapter()
    for name, p in _base_weights(model).items():
        assert (p - before[name]).abs().max() < 1e-6, name


def test_double_merge_warns_and_adds_once():
    model, run = _build("llama")
    with torch.no_grad():
        model.merge_adapter()
        once = run()
        with pytest.warns(UserWarning, match="already merged"):
            model.merge_adapter()
        assert torch.equal(run(), once)
        model.unmerge_adapter()
        model.unmerge_adapter()  # unmerging twice is a no-op too
        unmerged = run()
    assert (unmerged - once).abs().max() < 1e-5


def test_disable_adapter_gives_base_outputs_even_when_merged():
    model, run = _build("llama")
    model.merge_adapter()
    with torch.no_grad():
        with model.disable_adapter():
            disabled = run()
        after = run()
        model.unmerge_adapter()
        unmerged = run()
    torch.manual_seed(5)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref = tiny_llama()(input_ids=x).logits
    assert (disabled - ref).abs().max() < 1e-5
    assert (after - unmerged).abs().max() < 1e-5  # merged again after the block
    assert (after - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", list(ALL_TYPES))
def test_merge_and_unload_returns_plain_model_with_same_outputs(kind):
    model, run = _build(kind)
    with torch.no_grad():
        expected = run()
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (lorakit.LoraLayer,)) or "lora_" in n for n, m in plain.named_modules())
    assert type(plain).__module__.split(".")[0] != "lorakit"
    torch.manual_seed(5)
    x = torch.randn(2, 3, 16, 16) if kind == "convnet" else torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        got = plain(x) if kind == "convnet" else plain(input_ids=x).logits
    assert (got - expected).abs().max() < 1e-5


def test_unload_returns_base_model_even_after_merge():
    torch.manual_seed(5)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref = tiny_llama()(input_ids=x).logits
    model, _ = _build("llama")
    model.merge_adapter()
    plain = model.unload()
    with torch.no_grad():
        assert (plain(input_ids=x).logits - ref).abs().max() < 1e-5


def test_fresh_adapter_is_identity_and_only_adapters_train():
    torch.manual_seed(5)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref = tiny_llama()(input_ids=x).logits
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref)  # B = 0 at init
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_gaussian_and_false_init():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    layer = model.model.model.layers[0].self_attn.q_proj
    assert abs(layer.lora_A["default"].weight.std().item() - 1 / 4) < 0.05
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_B["default"].weight) > 0


def test_bias_modes_choose_trainable_biases():
    def trainable(bias):
        m = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
        return {n for n, p in m.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable("none") == set()
    lora_only = trainable("lora_only")
    assert lora_only and all("c_attn.base_layer" in n for n in lora_only)
    assert len(trainable("all")) > len(lora_only)


def test_multiple_adapters_set_delete_and_memory_release(tmp_path):
    model, run = _build("llama")
    with torch.no_grad():
        default_out = run()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.active_adapter == "default"
    randomize_adapters(model, seed=9)
    model.set_adapter("other")
    with torch.no_grad():
        other_out = run()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other." in n for n in trainable)
    assert (other_out - default_out).abs().max() > 1e-3
    n_before = sum(p.numel() for p in model.parameters())
    model.delete_adapter("other")
    assert model.active_adapter == "default"
    assert sum(p.numel() for p in model.parameters()) == n_before - 2 * 2 * (32 + 32)  # 2 layers x r=2 x (d_in + d_out)
    assert not any(".other" in n for n, _ in model.named_parameters())


def test_save_multiple_adapters_and_load_adapter(tmp_path):
    model, run = _build("llama")
    model.add_adapter("sql", LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model, seed=3)
    model.set_adapter("sql")
    with torch.no_grad():
        sql_out = run()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "sql" / "adapter_config.json").exists()
    torch.manual_seed(0)
    fresh = lorakit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    fresh.load_adapter(str(tmp_path / "sql"), adapter_name="sql")
    fresh.set_adapter("sql")
    torch.manual_seed(5)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert (fresh(input_ids=x).logits - sql_out).abs().max() < 1e-6


def test_attribute_forwarding_and_generate_matches_merged_model():
    model, _ = _build("llama")
    assert model.config.hidden_size == 32 and model.base_model.model is model.get_base_model()
    prompt = torch.tensor([[1, 5, 9, 22]])
    with torch.no_grad():
        unmerged = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        model.merge_adapter()
        merged = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(unmerged, merged) and unmerged.shape[1] == 10


def test_dropout_active_only_in_training():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5))
    randomize_adapters(model)
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(input_ids=x).logits, model(input_ids=x).logits)
        model.train()
        assert not torch.equal(model(input_ids=x).logits, model(input_ids=x).logits)


def test_saved_files_and_model_card_as_in_peft(tmp_path):
    import peft
    import yaml

    model, _ = _build("llama")
    model.get_base_model().config._name_or_path = "org/tiny-llama"
    theirs = peft.get_peft_model(_build("llama")[0].unload(), peft.LoraConfig(target_modules=["q_proj"]))
    theirs.get_base_model().config._name_or_path = "org/tiny-llama"
    cards = {}
    for name, m in (("ours", model), ("theirs", theirs)):
        m.save_pretrained(tmp_path / name)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == \
            ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        text = (tmp_path / name / "README.md").read_text()
        cards[name] = yaml.safe_load(text.split("---")[1])
    for key in ("library_name", "base_model", "tags", "pipeline_tag"):
        assert cards["ours"].get(key) == cards["theirs"].get(key), key
    assert "lora" in cards["ours"]["tags"] and cards["ours"]["base_model"] == "org/tiny-llama"
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "README.md").write_text("---\nmeta: hello\n---\nMy card\n")
    model.save_pretrained(tmp_path / "own")
    text = (tmp_path / "own" / "README.md").read_text()
    assert "meta: hello" in text and "My card" in text and "library_name: peft" in text


def test_new_adapter_modules_start_in_training_mode_as_in_peft():
    """PEFT's behaviour (kept, documented in docs/reference/peft-compatibility.md): wrappers and new adapter modules
    start in training mode whatever the base model's mode, so lora_dropout is live until model.eval(); base modules
    keep theirs."""
    import peft

    modes = {}
    for lib in (lorakit, peft):
        model = lib.get_peft_model(tiny_llama().eval(), lib.LoraConfig(r=4, target_modules=["q_proj"],
                                                                       lora_dropout=0.5))
        first = {n for n, m in model.named_modules() if m.training}
        model.eval()
        model.add_adapter("b", lib.LoraConfig(r=4, target_modules=["q_proj", "k_proj"], lora_dropout=0.5))
        second = {n for n, m in model.named_modules() if m.training}
        # PEFT also creates empty containers (lora_embedding_A, lora_magnitude_vector) lorakit does not
        modes[lib.__name__] = [{n for n in names if "embedding" not in n and "magnitude" not in n}
                               for names in (first, second)]
    assert modes["lorakit"] == modes["peft"]
    assert "" in modes["lorakit"][0] and not any(n.endswith("base_layer") for n in modes["lorakit"][0])
    assert "base_model.model.model.layers.0.self_attn.k_proj.lora_dropout.b" in modes["lorakit"][1]
