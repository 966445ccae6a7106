"""PEFT's public API, side by side: the same call on lorakit and on PEFT 0.21, same tiny models, same answers
(outputs, trainable parameters, files, training/eval mode, return values)."""

import copy
import json
import os
import re
import warnings

import peft
import pytest
import torch
from conftest import assert_close_fp32, copy_adapters_to_peft, randomize_adapters, tiny_llama

import lorakit

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _pair(**cfg):
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS) | cfg
    ours = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**cfg))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
    randomize_adapters(ours, seed=7, scale=0.3)
    copy_adapters_to_peft(ours, theirs)
    return ours, theirs


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trainable(model):
    return sorted(n.replace(".default", "") for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("loader", ["from_pretrained", "load_adapter"])
def test_loading_for_inference_puts_the_model_in_eval_mode_and_returns_peft_results(tmp_path, ids, loader):
    ours, _ = _pair(lora_dropout=0.5)
    ours.save_pretrained(tmp_path)
    results = {}
    for lib in (lorakit, peft):
        base = tiny_llama().train()  # a freshly built model may be in training mode
        if loader == "from_pretrained":
            model = lib.PeftModel.from_pretrained(base, str(tmp_path))
            result = None
        else:
            model = lib.get_peft_model(base, lib.LoraConfig(r=2, target_modules=["q_proj"]), "other")
            model.train()
            result = model.load_adapter(str(tmp_path), adapter_name="default")
            model.set_adapter("default")
        assert not model.training and not any(m.training for m in model.modules()), lib.__name__
        assert _logits(model, ids).equal(_logits(model, ids))  # dropout 0.5 is off: deterministic
        results[lib.__name__] = (_logits(model, ids), result)
    assert_close_fp32(results["lorakit"][0], results["peft"][0])
    if loader == "load_adapter":
        for _, result in results.values():
            assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []


def test_peft_keyword_arguments_are_accepted_and_mean_the_same(tmp_path, ids):
    for lib in (lorakit, peft):
        base = tiny_llama().to(torch.bfloat16)
        config = lib.LoraConfig(r=4, target_modules=TARGETS)
        model = lib.get_peft_model(base, config, adapter_name="x", autocast_adapter_dtype=False, revision="v1",
                                   low_cpu_mem_usage=False)
        layer = model.get_base_model().model.layers[0].self_attn.q_proj
        assert layer.lora_A["x"].weight.dtype == torch.bfloat16, lib.__name__  # kept in the base's dtype
        assert model.peft_config["x"].revision == "v1"
        fp32 = lib.get_peft_model(tiny_llama().to(torch.bfloat16), lib.LoraConfig(r=4, target_modules=TARGETS))
        assert fp32.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    outputs = {}
    for lib, model in zip(("lorakit", "peft"), _pair()):
        model.add_adapter("b", (lorakit if lib == "lorakit" else peft).LoraConfig(r=2, target_modules=["q_proj"]))
        out = tmp_path / lib
        model.save_pretrained(str(out / "bin"), safe_serialization=False, selected_adapters=["default"])
        written = set(os.listdir(out / "bin")) - {"README.md"}  # PEFT adds a model card
        assert written == {"adapter_config.json", "adapter_model.bin"}, lib
        model.save_pretrained(str(out / "none"), is_main_process=False)
        assert not (out / "none" / "adapter_config.json").exists()
        merged = model.merge_and_unload(progressbar=True, safe_merge=True, adapter_names=["default"])
        outputs[lib] = _logits(merged, ids)
    assert_close_fp32(outputs["lorakit"], outputs["peft"])


def test_several_active_adapters_add_and_layers_can_be_switched_off(ids):
    results = {}
    pair = _pair()
    for name, model in zip(("lorakit", "peft"), pair):
        lib = lorakit if name == "lorakit" else peft
        model.add_adapter("b", lib.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]))
    randomize_adapters(pair[0], seed=8, scale=0.3)
    copy_adapters_to_peft(*pair)
    for name, model in zip(("lorakit", "peft"), pair):
        model.base_model.set_adapter(["default", "b"])
        both = _logits(model, ids)
        trainable = _trainable(model)
        model.disable_adapter_layers()
        off = _logits(model, ids)
        model.enable_adapter_layers()
        results[name] = (both, off, _logits(model, ids), trainable, list(model.active_adapters))
    ours, theirs = results["lorakit"], results["peft"]
    for a, b in zip(ours[:3], theirs[:3]):
        assert_close_fp32(a, b)
    assert ours[3] == theirs[3] and ours[4] == theirs[4] == ["default", "b"]
    torch.testing.assert_close(ours[1], _logits(tiny_llama(), ids))  # disabled = the base model


def test_layer_delta_weight_bias_and_weight_passthrough():
    ours, theirs = _pair()
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        a, b = ours.get_base_model().get_submodule(path), theirs.get_base_model().get_submodule(path)
        torch.testing.assert_close(a.get_delta_weight("default"), b.get_delta_weight("default"))
        assert a.weight is a.base_layer.weight and a.bias is None and b.bias is None


def test_state_dict_helpers_config_loading_and_enums_match_peft(tmp_path, ids):
    ours, theirs = _pair()
    mine, their_sd = lorakit.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert sorted(mine) == sorted(their_sd)
    for key in their_sd:
        torch.testing.assert_close(mine[key], their_sd[key])
    fresh = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    result = lorakit.set_peft_model_state_dict(fresh, their_sd)
    assert list(result.unexpected_keys) == []
    assert_close_fp32(_logits(fresh, ids), _logits(theirs, ids))
    peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert type(lorakit.PeftConfig.from_pretrained(str(tmp_path))).__name__ == "VeraConfig"
    assert isinstance(lorakit.LoraConfig(), lorakit.PeftConfig)
    config = lorakit.LoraConfig(task_type=lorakit.TaskType.CAUSAL_LM, target_modules=["q_proj"])
    theirs_config = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])
    assert config.task_type == theirs_config.task_type == "CAUSAL_LM"
    assert config.peft_type == theirs_config.peft_type and config.peft_type.value == theirs_config.peft_type.value
    for value in (config.task_type, config.peft_type):  # enums, as PEFT's peft_type, that print as their names
        assert str(value) == value.value and f"{value}" == value.value
    assert lorakit.LoraConfig(task_type="CAUSAL_LM").task_type is lorakit.TaskType.CAUSAL_LM
    assert json.loads(json.dumps(config.to_dict()))["peft_type"] == "LORA"


def test_inject_adapter_in_model_matches_peft():
    ours = lorakit.inject_adapter_in_model(lorakit.LoraConfig(r=4, target_modules=TARGETS), tiny_llama())
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=TARGETS), tiny_llama())
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert _trainable(ours) == _trainable(theirs)


def test_low_cpu_mem_usage_injects_meta_placeholders_that_a_state_dict_fills_as_in_peft():
    config = dict(r=4, target_modules=TARGETS, init_lora_weights=False)
    trained = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**config))
    state = lorakit.get_peft_model_state_dict(trained)
    ours = lorakit.inject_adapter_in_model(lorakit.LoraConfig(**config), tiny_llama(), low_cpu_mem_usage=True)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), tiny_llama(), low_cpu_mem_usage=True)
    meta = {n for n, p in ours.named_parameters() if p.is_meta}
    assert meta == {n for n, p in theirs.named_parameters() if p.is_meta} and meta
    assert all("lora_" in n for n in meta)
    lorakit.set_peft_model_state_dict(ours, state)
    assert not any(p.is_meta for p in ours.parameters())
    assert _trainable(ours) == _trainable(theirs)
    ids = torch.randint(0, 128, (2, 7))
    torch.testing.assert_close(ours(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)


def test_prepare_model_for_kbit_training_matches_peft():
    models = [tiny_llama().to(torch.bfloat16) for _ in range(2)]
    ours = lorakit.prepare_model_for_kbit_training(models[0])
    theirs = peft.prepare_model_for_kbit_training(models[1])
    assert [(n, p.dtype, p.requires_grad) for n, p in ours.named_parameters()] == \
        [(n, p.dtype, p.requires_grad) for n, p in theirs.named_parameters()]


def test_task_classes_and_classifier_head_as_in_peft(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def classifier():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=3, pad_token_id=0)).eval()

    seen = {}
    for lib in (lorakit, peft):
        model = lib.get_peft_model(classifier(), lib.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=TARGETS))
        causal = lib.get_peft_model(tiny_llama(), lib.LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS))
        model.save_pretrained(str(tmp_path / lib.__name__))
        from safetensors.torch import load_file

        keys = sorted(load_file(str(tmp_path / lib.__name__ / "adapter_model.safetensors")))
        seen[lib.__name__] = (type(model).__name__, type(causal).__name__, _trainable(model), keys,
                              sorted(model.peft_config["default"].modules_to_save))
    assert seen["lorakit"] == seen["peft"]
    assert seen["lorakit"][0] == "PeftModelForSequenceClassification"
    assert any("score" in n for n in seen["lorakit"][2])


def test_init_lora_weights_names_are_case_insensitive_as_in_peft():
    for init in ("OLoRA", "Gaussian"):
        torch.manual_seed(0)
        ours = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"],
                                                                      init_lora_weights=init))
        peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init))
        layer = ours.get_base_model().model.layers[0].self_attn.q_proj
        if init == "OLoRA":  # the adapter holds W's principal part: base + ΔW is the original weight
            assert_close_fp32(layer.base_layer.weight + layer.get_delta_weight("default"), tiny_llama().model.layers[0].self_attn.q_proj.weight)
        else:
            assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 4, rel=0.3)


def test_base_rows_named_as_in_peft_and_a_second_adapter_with_bias_is_refused(ids):
    ours, theirs = _pair()
    rows = ["default", "__base__"]
    for model in (ours, theirs):
        model.train()
        with pytest.raises(ValueError, match="training mode"):
            model(input_ids=ids, adapter_names=rows)
        model.eval()
    with torch.no_grad():
        mine = ours(input_ids=ids, adapter_names=rows).logits
        their = theirs(input_ids=ids, adapter_names=rows).logits
    assert_close_fp32(mine, their)
    assert_close_fp32(mine[1], _logits(tiny_llama(), ids)[1])
    for model, lib in ((ours, lorakit), (theirs, peft)):
        model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["q_proj"], bias="all"))  # one with bias: fine
        with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
            model.add_adapter("c", lib.LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"))


def test_peft_style_script_prints_the_same_numbers_on_lorakit_and_peft(tmp_path):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "peft_script.py")
    text = open(script).read()
    assert "from lorakit import" in text
    (tmp_path / "with_peft.py").write_text(text.replace("from lorakit import", "from peft import"))
    printed = {}
    for name, path in (("lorakit", script), ("peft", str(tmp_path / "with_peft.py"))):
        run = subprocess.run([sys.executable, path, str(tmp_path / name)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        printed[name] = run.stdout.splitlines()
    assert printed["lorakit"] == printed["peft"]
    assert "training after from_pretrained: False" in printed["lorakit"]


def test_layer_and_model_status_report_what_peft_reports():
    import dataclasses

    statuses = {}
    for name, model in zip(("lorakit", "peft"), _pair()):
        lib = lorakit if name == "lorakit" else peft
        model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["q_proj"]))
        model.base_model.set_adapter(["default", "b"])
        model.merge_adapter(["b"])
        layers = [dataclasses.asdict(s) | {"module_type": None} for s in lib.get_layer_status(model)]
        overall = dataclasses.asdict(model.get_model_status())
        statuses[name] = (layers, overall)
    assert statuses["lorakit"][0] == statuses["peft"][0]
    assert statuses["lorakit"][1] == statuses["peft"][1]


def test_cat_combination_with_a_rank_pattern_equals_peft(ids):
    cfgs = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}),
            dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])]
    models = {}
    for lib in (lorakit, peft):
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(**cfgs[0]), "a")
        model.add_adapter("b", lib.LoraConfig(**cfgs[1]))
        models[lib.__name__] = model
    randomize_adapters(models["lorakit"], seed=3, scale=0.3)
    copy_adapters_to_peft(models["lorakit"], models["peft"])
    logits = {}
    for name, model in models.items():
        model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "c", combination_type="cat")
        model.set_adapter("c")
        logits[name] = _logits(model.eval(), ids)
        assert model.peft_config["c"].r == 6
    assert_close_fp32(logits["lorakit"], logits["peft"])


class _GroupedConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.head = torch.nn.Conv2d(8, 6, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def test_lora_on_grouped_convolutions_as_in_peft(tmp_path):
    cfg = dict(r=4, lora_alpha=8, target_modules=["conv"])
    ours = lorakit.get_peft_model(_GroupedConvNet(), lorakit.LoraConfig(**cfg))
    theirs = peft.get_peft_model(_GroupedConvNet(), peft.LoraConfig(**cfg))
    randomize_adapters(ours, seed=2, scale=0.3)
    copy_adapters_to_peft(ours, theirs)
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(3))
    out_ours, out_theirs = ours(x), theirs(x)
    assert_close_fp32(out_ours, out_theirs)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    for (n, p), (m, q) in zip(sorted((n, p) for n, p in ours.named_parameters() if p.requires_grad),
                              sorted((n, p) for n, p in theirs.named_parameters() if p.requires_grad)):
        assert n == m and p.grad is not None
        assert_close_fp32(p.grad, q.grad)
    ours.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(_GroupedConvNet(), str(tmp_path))
    assert_close_fp32(loaded(x), out_ours.detach())
    with pytest.raises(ValueError, match="grouped"):
        ours.merge_adapter()
    with pytest.raises(NotImplementedError):
        theirs.merge_adapter()
    with pytest.raises(ValueError, match="divisible by groups"):
        lorakit.get_peft_model(_GroupedConvNet(), lorakit.LoraConfig(r=3, target_modules=["conv"]))


def test_lora_bias_rules_as_in_peft():
    """lora_bias: refused with DoRA / SVD inits and on embeddings; merging needs a base bias."""
    for lib in (lorakit, peft):
        for bad in (dict(use_dora=True), dict(init_lora_weights="pissa")):
            with pytest.raises(ValueError, match="lora_bias"):
                lib.LoraConfig(target_modules=["q_proj"], lora_bias=True, **bad)
        with pytest.raises(ValueError, match="lora_bias"):
            lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=["embed_tokens"], lora_bias=True))
        with pytest.warns(UserWarning, match="has no bias"):
            model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=["q_proj"], lora_bias=True))
        with pytest.raises(RuntimeError, match="no bias"):
            model.merge_adapter()


def test_trainable_tokens_with_several_adapters_as_in_peft(ids):
    """Two adapters with their own trained rows: switching, disabling, mixed batches, overlap refused,
    delete; the tied lm_head follows the embedding's rows."""
    models = {}
    for lib in (lorakit, peft):
        model = lib.get_peft_model(tiny_llama(tie=True), lib.LoraConfig(target_modules=["q_proj"],
                                                                        trainable_token_indices=[1, 2, 40]))
        model.add_adapter("b", lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 40]))
        models[lib.__name__] = model
    randomize_adapters(models["lorakit"], seed=4, scale=0.5)
    copy_adapters_to_peft(models["lorakit"], models["peft"])
    ids = torch.tensor([[1, 2, 3, 40, 7], [40, 3, 3, 9, 1]])
    seen = {}
    for name, model in models.items():
        model.eval()
        out = {}
        for adapter in ("default", "b"):
            model.set_adapter(adapter)
            out[adapter] = _logits(model, ids)
        with model.disable_adapter():
            out["off"] = _logits(model, ids)
        out["mixed"] = model(input_ids=ids, adapter_names=["b", "default"]).logits.detach()
        with pytest.raises(ValueError, match="Only one adapter"):
            model.base_model.set_adapter(["default", "b"])
        assert model.active_adapters == ["b"]
        model.set_adapter("default")
        model.delete_adapter("b")
        out["after_delete"] = _logits(model, ids)
        seen[name] = out
    for key, value in seen["peft"].items():
        assert_close_fp32(seen["lorakit"][key], value, msg=key)
    assert not torch.allclose(seen["lorakit"]["default"], seen["lorakit"]["b"])
    torch.testing.assert_close(seen["lorakit"]["mixed"][0], seen["lorakit"]["b"][0])
    torch.testing.assert_close(seen["lorakit"]["mixed"][1], seen["lorakit"]["default"][1])
    torch.testing.assert_close(seen["lorakit"]["off"], _logits(tiny_llama(tie=True), ids), atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="trainable_token_indices"):
        lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["embed_tokens"],
                                                                trainable_token_indices=[1]))
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"],
                                                                trainable_token_indices=[1, 128]))


def test_ensure_weight_tying_warnings_errors_and_training_as_in_peft():
    for lib in (lorakit, peft):
        with pytest.warns(UserWarning, match="no tied modules were found"):
            lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=["embed_tokens"], ensure_weight_tying=True))
        with pytest.warns(UserWarning, match="`ensure_weight_tying` is not set to True"):
            lib.get_peft_model(tiny_llama(tie=True), lib.LoraConfig(target_modules=["embed_tokens"]))
        with pytest.raises(ValueError, match="different token indices"):
            lib.get_peft_model(tiny_llama(tie=True), lib.LoraConfig(
                target_modules=["q_proj"], ensure_weight_tying=True,
                trainable_token_indices={"embed_tokens": [1], "lm_head": [2]}))
        with pytest.raises(ValueError, match="already marked to be trained fully"):
            lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                            trainable_token_indices={"embed_tokens": [1]}))
    # training keeps a tied LoRA tied: the head's ΔW stays the embedding's after optimizer steps
    model = lorakit.get_peft_model(tiny_llama(tie=True), lorakit.LoraConfig(
        target_modules=["embed_tokens"], ensure_weight_tying=True, init_lora_weights="gaussian"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    inner = model.get_base_model()
    head_delta = inner.lm_head.get_delta_weight("default")
    assert head_delta.abs().max() > 0
    torch.testing.assert_close(head_delta, inner.model.embed_tokens.get_delta_weight("default"))


def test_adalora_training_loop_written_for_peft_gives_peft_numbers(tmp_path):
    """PEFT's documented AdaLoRA loop (loss with the orthogonality term from forward, then
    `model.base_model.update_and_allocate(step)` between optimizer.step() and zero_grad()) on both libraries:
    same parameters, losses, rank allocation, saved files."""
    cfg = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=12, lora_alpha=8,
               target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    models = {"lorakit": lorakit.get_peft_model(tiny_llama(), lorakit.AdaLoraConfig(**cfg)),
              "peft": peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**cfg))}
    randomize_adapters(models["lorakit"], seed=3, scale=0.2)
    copy_adapters_to_peft(models["lorakit"], models["peft"])
    ours, theirs = models["lorakit"], models["peft"]
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert type(ours.base_model.rankallocator).__name__ == "RankAllocator"
    assert ours.base_model.trainable_adapter_name == theirs.base_model.trainable_adapter_name == "default"
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name, model in models.items():
        model.train()
        params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        losses[name] = []
        for step in range(12):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["lorakit"]), torch.tensor(losses["peft"]), atol=1e-4, rtol=1e-4)
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern
    theirs_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs_state[key], atol=1e-4, rtol=1e-4, msg=key)
    for name, model in models.items():
        model.save_pretrained(str(tmp_path / name))
    for name in models:
        from_file = {}
        for lib in (lorakit, peft):
            loaded = lib.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / name))
            from_file[lib.__name__] = _logits(loaded, ids)
        assert_close_fp32(from_file["lorakit"], from_file["peft"])
    saved = [lorakit.PeftConfig.from_pretrained(str(tmp_path / name)).rank_pattern for name in models]
    assert saved[0] == saved[1] and all(k.endswith(".lora_E") for k in saved[0])
    ours.resize_modules_by_rank_pattern(ours.peft_config["default"].rank_pattern, "default")
    assert sum(layer.r["default"] for layer in ours.base_model._layers()) == 2 * 2 * 3  # target_r x targets
    with pytest.raises(TypeError):
        ours.add_weighted_adapter(["default"], [1.0], "sum")
    with pytest.raises(ValueError, match="only 1 trainable adapter"):
        ours.add_adapter("second", lorakit.AdaLoraConfig(**cfg))


class _AttentionNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        mixed, _ = self.attn(x, x, x, need_weights=False)
        return self.head(mixed)


def test_lora_on_multihead_attention_is_w_plus_delta_and_uses_peft_names(tmp_path):
    """in_proj's adapter on the layer, out_proj's on a nested LoRA Linear (PEFT's names, files, counts).
    PEFT 0.21 adds out_proj's ΔW twice (huggingface/peft#3774, open): outputs are compared with PEFT where
    out_proj's adapter is zero, and with the exact W + ΔW reference everywhere."""
    cfg = dict(target_modules=["attn", "head"], r=3, lora_alpha=6)
    ours = lorakit.get_peft_model(_AttentionNet(), lorakit.LoraConfig(**cfg))
    theirs = peft.get_peft_model(_AttentionNet(), peft.LoraConfig(**cfg))
    randomize_adapters(ours, seed=5, scale=0.3)
    copy_adapters_to_peft(ours, theirs)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert _trainable(ours) == _trainable(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    # the reference: a plain copy with W + ΔW written into in_proj and out_proj, autograd through A and B
    attn = ours.get_base_model().attn
    reference = _AttentionNet()
    weights = {"attn.in_proj_weight": reference.attn.in_proj_weight + attn.get_delta_weight("default"),
               "attn.out_proj.weight": reference.attn.out_proj.weight + attn.out_proj.get_delta_weight("default"),
               "head.weight": reference.head.weight + ours.get_base_model().head.get_delta_weight("default")}
    expected = torch.func.functional_call(reference, weights, (x,))
    got = ours(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    params = [p for _, p in sorted(ours.named_parameters()) if p.requires_grad]
    for a, b in zip(torch.autograd.grad(got.square().sum(), params),
                    torch.autograd.grad(expected.square().sum(), params)):
        assert_close_fp32(a, b)
    with torch.no_grad():
        assert_close_fp32(copy.deepcopy(ours).merge_and_unload()(x), got.detach())
    # beside PEFT, with out_proj's adapter at zero (where PEFT's double count makes no difference)
    for model in (ours, theirs):
        torch.nn.init.zeros_(model.get_base_model().attn.base_layer.out_proj.lora_B["default"].weight)
    out_ours, out_theirs = ours(x), theirs(x)
    assert_close_fp32(out_ours, out_theirs)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert_close_fp32(p.grad, theirs_grads[name].grad, msg=name)
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    for lib, other in ((peft, "ours"), (lorakit, "theirs")):
        loaded = lib.PeftModel.from_pretrained(_AttentionNet(), str(tmp_path / other))
        assert_close_fp32(loaded(x), out_ours.detach())
    plain = ours.merge_and_unload()
    assert type(plain.attn) is torch.nn.MultiheadAttention and type(plain.attn.out_proj) is not lorakit.LoraLinear
    with pytest.raises(ValueError, match="DoRA"):
        lorakit.get_peft_model(_AttentionNet(), lorakit.LoraConfig(target_modules=["attn"], use_dora=True))
    with pytest.raises(ValueError, match="_qkv_same_embed_dim"):
        net = torch.nn.Module()
        net.attn = torch.nn.MultiheadAttention(16, 4, kdim=8, vdim=8)
        lorakit.get_peft_model(net, lorakit.LoraConfig(target_modules=["attn"]))


@pytest.mark.parametrize("config", [dict(cls="LoraConfig", r=4), dict(cls="VeraConfig", r=8),
                                    dict(cls="AdaLoraConfig", init_r=4, target_r=2, total_step=10)])
def test_model_prefix_is_peft_s(config):
    """`model.prefix` (and `model.base_model.prefix`), which PEFT's helpers and TRL's weight sync read, is PEFT's
    for the form: every trainable adapter parameter's name holds it."""
    kw = {k: v for k, v in config.items() if k != "cls"}
    ours = lorakit.get_peft_model(tiny_llama(), getattr(lorakit, config["cls"])(target_modules=["q_proj"], **kw))
    theirs = peft.get_peft_model(tiny_llama(), getattr(peft, config["cls"])(target_modules=["q_proj"], **kw))
    assert ours.prefix == ours.base_model.prefix == theirs.prefix == theirs.base_model.prefix
    assert all(ours.prefix in n for n, p in ours.named_parameters() if p.requires_grad)


def test_base_model_state_dict_helpers_and_get_submodules_match_peft():
    """PEFT's get_base_model_state_dict / set_base_model_state_dict (original keys, no adapter tensors, wrapper
    infixes dropped) and peft.utils._get_submodules give the same keys and tensors on lorakit's models."""
    from peft.utils import _get_submodules as peft_get_submodules

    from lorakit.utils import _get_submodules

    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
               trainable_token_indices=[1, 2])
    ours = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**cfg))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
    mine, their = lorakit.get_base_model_state_dict(ours), peft.get_base_model_state_dict(theirs)
    assert sorted(mine) == sorted(their) == sorted(tiny_llama().state_dict())
    assert all(torch.equal(mine[k], their[k]) for k in mine)
    fresh = {k: torch.randn_like(v) for k, v in mine.items()}
    assert lorakit.set_base_model_state_dict(ours, fresh) == ([], [])
    assert all(torch.equal(lorakit.get_base_model_state_dict(ours)[k], v) for k, v in fresh.items())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        lorakit.set_base_model_state_dict(ours, {**fresh, "nope.weight": torch.zeros(1)})
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    (p1, t1, n1), (p2, t2, n2) = _get_submodules(ours, key), peft_get_submodules(theirs, key)
    assert (type(p1).__name__, n1) == (type(p2).__name__, n2) and t1.base_layer.weight.shape == t2.base_layer.weight.shape


def test_active_adapter_is_a_name_or_the_list_of_names_as_in_peft():
    """`active_adapter` is the name while one adapter is active and the list when several are (PEFT's tuner)."""
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"])
    ours = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**cfg))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
    for model, lib in ((ours, lorakit), (theirs, peft)):
        model.add_adapter("other", lib.LoraConfig(**cfg))
    seen = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        steps = [model.active_adapter]
        model.set_adapter("other")
        steps.append(model.active_adapter)
        model.base_model.set_adapter(["default", "other"])
        steps += [model.base_model.active_adapter, model.active_adapters]
        seen[name] = steps
    assert seen["ours"] == seen["theirs"] == ["default", "other", ["default", "other"], ["default", "other"]]


def test_layer_level_set_adapter_enable_adapters_and_adapter_names_as_in_peft(ids):
    """PEFT's layer API: layer.set_adapter(name) activates it there and makes only its parameters trainable,
    enable_adapters(False) freezes every adapter and gives the base output, True restores the active one;
    _all_available_adapter_names lists every adapter the layer holds."""
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"])
    ours = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**cfg))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
    results = {}
    for name, model, lib in (("ours", ours, lorakit), ("theirs", theirs, peft)):
        model.add_adapter("other", lib.LoraConfig(**cfg))
        layer = model.get_base_model().model.layers[0].self_attn.q_proj
        layer.set_adapter("other")
        grads = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
        layer.enable_adapters(False)
        frozen = [n for n, p in layer.named_parameters() if p.requires_grad]
        off = layer.disable_adapters
        layer.enable_adapters(True)
        results[name] = (layer._all_available_adapter_names(), grads, frozen, off, layer.disable_adapters,
                         list(layer.active_adapters))
    assert results["ours"] == results["theirs"]
    assert results["ours"][1] == ["lora_A.other.weight", "lora_B.other.weight"]


def test_layer_repr_names_the_class_as_peft():
    from conftest import ConvNet, tiny_gpt2

    cases = [(tiny_llama, ["q_proj", "embed_tokens"]), (tiny_gpt2, ["c_attn"]), (ConvNet, ["conv1", "head"])]
    for build, targets in cases:
        torch.manual_seed(0)
        ours = lorakit.get_peft_model(build(), lorakit.LoraConfig(r=2, target_modules=targets))
        theirs = peft.get_peft_model(build(), peft.LoraConfig(r=2, target_modules=targets))
        names = [n for n, m in ours.named_modules() if isinstance(m, lorakit.layers.LoraLayer)]
        assert names
        for name in names:
            ours_repr, theirs_repr = repr(ours.get_submodule(name)), repr(theirs.get_submodule(name))
            assert ours_repr.split("(")[0] == theirs_repr.split("(")[0], name


def test_switches_trainable_flags_and_layer_dicts_follow_peft():
    """disable_adapter restores the previous on/off state (warns on a mix), set_requires_grad, live layer dicts."""
    results = {}
    for lib in (lorakit, peft):
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=4, target_modules=TARGETS))
        model.add_adapter("other", lib.LoraConfig(r=2, target_modules=TARGETS))
        seen = [_trainable(model)]
        with model.disable_adapter():
            seen.append(_trainable(model))
        seen.append(_trainable(model))
        model.set_requires_grad("other")
        seen.append(_trainable(model))
        model.disable_adapter_layers()
        seen.append(_trainable(model))
        with model.disable_adapter():
            pass
        layers = [m for m in model.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")]
        seen.append([m.disable_adapters for m in layers])
        layers[0].enable_adapters(True)
        with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
            with model.disable_adapter():
                pass
        seen.append([m.disable_adapters for m in layers])
        r_view = layers[0].r
        model.delete_adapter("other")
        seen.append(sorted(r_view))
        results[lib.__name__] = seen
    assert results["lorakit"] == results["peft"]


def _error(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call()
        except Exception as e:  # noqa: BLE001 (the test compares whatever each library raises)
            return type(e).__name__, str(e)
    return None, ""


@pytest.mark.parametrize("case", ["unknown", "merged", "duplicate", "module_copies", "parameters_type"])
def test_refusals_raise_peft_error_type_with_peft_wording(case):
    """Same refusal, same error type, and lorakit's message starts with PEFT's first sentence (detail after it)."""
    found = {}
    for lib in (lorakit, peft):
        def build(**kw):
            return lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=4, target_modules=TARGETS, **kw))
        if case == "unknown":
            found[lib] = _error(lambda: build().delete_adapter("nope"))
        elif case == "merged":
            model = build()
            model.merge_adapter()
            found[lib] = _error(lambda: model.delete_adapter("default"))
        elif case == "duplicate":
            model = build()
            found[lib] = _error(lambda: model.add_adapter("default", lib.LoraConfig(target_modules=TARGETS)))
        elif case == "module_copies":
            model = build(modules_to_save=["lm_head"])
            model.add_adapter("other", lib.LoraConfig(r=4, target_modules=TARGETS, modules_to_save=["lm_head"]))
            found[lib] = _error(lambda: model.base_model.set_adapter(["default", "other"]))
        else:
            found[lib] = _error(lambda: lib.LoraConfig(target_parameters="q_proj.weight"))
    (ours_type, ours), (theirs_type, theirs) = found[lorakit], found[peft]
    assert theirs_type is not None and ours_type == theirs_type
    first_sentence = re.split(r"\. |:|\(", theirs)[0].rstrip(".")  # PEFT's words before any detail
    assert first_sentence in ours, (ours, theirs)


def test_merging_twice_warns_with_peft_wording():
    caught = {}
    for lib in (lorakit, peft):
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=4, target_modules=TARGETS))
        model.merge_adapter()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model.merge_adapter()
        caught[lib] = {str(w.message) for w in seen}
    assert caught[lorakit] == caught[peft] == {"All adapters are already merged, nothing to do."}


def test_bin_adapter_and_passed_config_load_as_in_peft(tmp_path):
    config = dict(r=4, target_modules=TARGETS, init_lora_weights=False)
    ids = torch.randint(0, 128, (1, 6))
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config)).save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    logits = {}
    for lib in (lorakit, peft):
        passed = lib.LoraConfig(**config)
        model = lib.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), config=passed)
        assert model.peft_config["default"] is passed and passed.inference_mode
        logits[lib] = _logits(model, ids)
    assert_close_fp32(logits[lorakit], logits[peft])


class _TiedCausalLM(torch.nn.Module):
    """A custom LM without get_output_embeddings: its tied head is declared only in `_tied_weights_keys`."""

    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(50, 16)
        self.linear = torch.nn.Linear(16, 16, bias=False)
        self.lm_head = torch.nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, ids):
        return self.lm_head(self.linear(self.embed_tokens(ids)))


@pytest.mark.parametrize("where", ["modules_to_save", "target_modules"])
def test_tied_head_declared_in_tied_weights_keys_is_tied_as_in_peft(where):
    kinds = {}
    for lib in (lorakit, peft):
        torch.manual_seed(0)
        extra = {"modules_to_save": ["embed_tokens"]} if where == "modules_to_save" else {}
        targets = ["linear"] if where == "modules_to_save" else ["embed_tokens"]
        model = lib.get_peft_model(_TiedCausalLM(), lib.LoraConfig(r=2, target_modules=targets,
                                                                    ensure_weight_tying=True, **extra))
        inner = model.get_base_model()
        kinds[lib] = [repr(inner.embed_tokens).split("(")[0], repr(inner.lm_head).split("(")[0]]
        shared = {n: p.data_ptr() for n, p in inner.lm_head.named_parameters()}
        emb = dict(inner.embed_tokens.named_parameters())
        if where == "modules_to_save":
            assert all(shared[n] == emb[n].data_ptr() for n in emb if "modules_to_save" in n)
    assert kinds[lorakit] == kinds[peft]
    assert kinds[lorakit] == (["ModulesToSaveWrapper"] * 2 if where == "modules_to_save" else
                              ["lora.Embedding", "lora.Linear"])


def test_vera_projections_exposed_where_peft_exposes_them():
    config = dict(r=4, target_modules=["q_proj", "down_proj"], projection_prng_key=3)
    ours = lorakit.get_peft_model(tiny_llama(), lorakit.VeraConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.VeraConfig(**config))
    layer = ours.get_base_model().model.layers[0].mlp.down_proj
    for attr in ("vera_A", "vera_B"):
        mine, peft_tensor = getattr(ours, attr)["default"], getattr(theirs, attr)["default"]
        torch.testing.assert_close(mine, peft_tensor, rtol=0, atol=0)  # same PRNG, same shapes
        assert getattr(layer, attr)["default"].data_ptr() == mine.data_ptr()  # one shared tensor
    ours.delete_adapter("default")
    assert "default" not in layer.__dict__.get("adapters", {}) and not hasattr(ours, "vera_A")
