"""lorakit vs PEFT 0.21 on the same weights: outputs, gradients, files in both directions, counts."""

import re

import peft
import pytest
import torch
from conftest import ConvNet, assert_close_fp32, clone, randomize_adapters, tiny_gpt2, tiny_llama

import lorakit
from lorakit.adapters.peft_format import adapter_state_dict

CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj", "embed_tokens"], r=4, lora_alpha=8)),
    "llama_patterns": (tiny_llama, dict(target_modules="all-linear", r=4, lora_alpha=8,
                                        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
                                        alpha_pattern={"v_proj": 3.0}, modules_to_save=["lm_head"])),
    "llama_rslora_layers": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                                             use_rslora=True, layers_to_transform=[1], layers_pattern="layers")),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=16,
                             fan_in_fan_out=True, bias="lora_only")),
    "convnet": (lambda: ConvNet().eval(), dict(target_modules=["conv1", "conv2", "conv1d", "conv3d", "head"],
                                               r=2, lora_alpha=4)),
    "mlp": (lambda: MLP().eval(), dict(target_modules=["inner", "outer"], r=3, lora_alpha=6)),
    # bias="all": the base layers' biases train too (through the fused kernel's bias gradient)
    "mlp_bias_all": (lambda: MLP().eval(), dict(target_modules=["inner", "outer"], r=3, lora_alpha=6, bias="all")),
    # lora_bias: lora_B carries a bias (PEFT's option for adapters extracted from full fine-tunes)
    "mlp_lora_bias": (lambda: MLP().eval(), dict(target_modules=["inner", "outer"], r=3, lora_alpha=6,
                                                 lora_bias=True)),
    "convnet_lora_bias": (lambda: ConvNet().eval(), dict(target_modules=["conv1", "conv1d", "conv3d", "head"],
                                                         r=2, lora_alpha=4, lora_bias=True)),
    "gpt2_lora_bias": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=16, fan_in_fan_out=True,
                                       lora_bias=True)),
    # trainable_token_indices: chosen embedding rows trained (a tied lm_head shares them), beside LoRA
    "llama_tokens": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                                      trainable_token_indices=[0, 5, 77])),
    "llama_tied_tokens": (lambda: tiny_llama(tie=True), dict(target_modules=["q_proj"], r=4, lora_alpha=8,
                                                             trainable_token_indices=[3, 9])),
    "llama_token_dict": (tiny_llama, dict(target_modules=["down_proj"], r=2, lora_alpha=8,
                                          trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [4, 120]})),
    # ensure_weight_tying on a tied model: the lm_head's adapter shares the embedding's tensors
    "tied_lora_embedding": (lambda: tiny_llama(tie=True), dict(target_modules=["q_proj", "embed_tokens"], r=4,
                                                               lora_alpha=8, ensure_weight_tying=True)),
    "tied_lora_head": (lambda: tiny_llama(tie=True), dict(target_modules=["lm_head"], r=4, lora_alpha=8,
                                                          ensure_weight_tying=True)),
    "tied_saved_embedding": (lambda: tiny_llama(tie=True), dict(target_modules=["q_proj"], r=4, lora_alpha=8,
                                                                modules_to_save=["embed_tokens"],
                                                                ensure_weight_tying=True)),
    # a sequence classifier: the `score` head is trained and saved whole (modules_to_save), as PEFT does
    "llama_seq_cls": (lambda: tiny_llama_classifier(), dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                                                            task_type="SEQ_CLS")),
    "grouped_conv": (lambda: GroupedConvNet().eval(), dict(target_modules=["conv", "head"], r=4, lora_alpha=8)),
    # DoRA's norm on a grouped conv uses PEFT's stand-in for ΔW (B A has no grouped shape): same outputs as PEFT
    "grouped_conv_dora": (lambda: GroupedConvNet().eval(), dict(target_modules=["conv", "head"], r=4, lora_alpha=8,
                                                                use_dora=True)),
}
# PEFT adds a tied LoRA's ΔW to the shared weight twice when merging (its merged model is wrong); lorakit
# merges it once: test_tied_lora_merges_once checks lorakit's merge against its own unmerged outputs.
MERGEABLE = set(CASES) - {"tied_lora_embedding", "tied_lora_head", "grouped_conv", "grouped_conv_dora"}  # grouped: PEFT refuses too


def tiny_llama_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


class GroupedConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.head = torch.nn.Conv2d(8, 6, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(10, 16)
        self.outer = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.outer(torch.relu(self.inner(x)))


def _inputs(case):
    torch.manual_seed(5)
    if case.startswith("convnet"):
        return torch.randn(2, 3, 16, 16)
    if case.startswith("grouped_conv"):
        return torch.randn(2, 4, 5, 5)
    if case.startswith("mlp"):
        return torch.randn(2, 5, 10)
    return torch.randint(0, 128, (2, 9))


def _ours_name(peft_name: str) -> str:
    """PEFT keeps DoRA's magnitude in a module (`lora_magnitude_vector.<adapter>.weight`), lorakit as the parameter
    `lora_magnitude_vector.<adapter>`; files use the same key (test_lorakit_file_loads_in_peft_with_same_outputs)."""
    return re.sub(r"(lora_magnitude_vector\.[^.]+)\.weight$", r"\1", peft_name)


def _run(model, x, case):
    return model(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else model(input_ids=x).logits


def _pair(case):
    """Same base weights and same adapter weights in a PEFT model and a lorakit model."""
    build, kwargs = CASES[case]
    torch.manual_seed(0)
    base = build()
    ours = lorakit.get_peft_model(clone(base), lorakit.LoraConfig(**kwargs))
    randomize_adapters(ours)
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**kwargs))
    state = adapter_state_dict(ours.model, "default", ours.peft_config["default"])
    result = peft.set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys, result.unexpected_keys
    missing = [k for k in result.missing_keys if "lora_" in k]
    assert not missing, missing
    return ours, theirs


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_equal_peft(case):
    ours, theirs = _pair(case)
    x = _inputs(case)
    out_ours, out_theirs = _run(ours, x, case), _run(theirs, x, case)
    assert (out_ours - out_theirs).abs().max() < 1e-5
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    grads_theirs = {_ours_name(k).replace(".default", ""): p.grad for k, p in theirs.named_parameters()
                    if p.requires_grad}
    grads_ours = {k.replace(".default", ""): p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert set(grads_ours) == set(grads_theirs)
    for key, grad in grads_ours.items():
        assert (grad - grads_theirs[key]).abs().max() < 1e-5, key


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_parameter_counts_equal_peft(case):
    ours, theirs = _pair(case)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_file_loads_in_peft_with_same_outputs(case, tmp_path):
    ours, _ = _pair(case)
    build, _ = CASES[case]
    x = _inputs(case)
    ours.save_pretrained(tmp_path)
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path)
    assert (_run(ours, x, case) - _run(theirs, x, case)).abs().max() < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_in_lorakit_with_same_outputs(case, tmp_path):
    _, theirs = _pair(case)
    build, _ = CASES[case]
    x = _inputs(case)
    theirs.save_pretrained(tmp_path)
    torch.manual_seed(0)
    ours = lorakit.PeftModel.from_pretrained(build(), str(tmp_path))
    assert (_run(ours, x, case) - _run(theirs, x, case)).abs().max() < 1e-5
    assert ours.get_nb_trainable_parameters()[0] == 0  # loaded for inference, as in PEFT


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=r".*layers\.0\.(self_attn|mlp)\.(q|up)_proj"),
    dict(target_modules="all-linear"),
    dict(target_modules="all-linear", exclude_modules=["o_proj", "down_proj"]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0], layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=1),
])
def test_injection_targets_same_modules_as_peft(kwargs):
    ours = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    ours_names = sorted(n for n, m in ours.model.named_modules() if isinstance(m, lorakit.LoraLayer))
    theirs_names = sorted(n for n, m in theirs.base_model.model.named_modules()
                          if isinstance(m, peft.tuners.lora.LoraLayer))
    assert ours_names == theirs_names and ours_names


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_keys_values_and_mode_equal_peft(case):
    ours, theirs = _pair(case)
    assert ours.training == theirs.training
    ours_modes, theirs_modes = ({n: m.training for n, m in model.named_modules()} for model in (ours, theirs))
    common = ours_modes.keys() & theirs_modes.keys()  # PEFT keeps empty containers lorakit does not create
    assert len(common) > len(ours_modes) * 0.9
    assert {n: ours_modes[n] for n in common} == {n: theirs_modes[n] for n in common}
    ours_state, theirs_state = ours.state_dict(), {_ours_name(k): v for k, v in theirs.state_dict().items()}
    assert sorted(ours_state) == sorted(theirs_state)
    for key, value in ours_state.items():
        torch.testing.assert_close(value, theirs_state[key], atol=0, rtol=0, msg=key)
    ours_file, theirs_file = lorakit.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert sorted(ours_file) == sorted(theirs_file)


@pytest.mark.parametrize("case", sorted(MERGEABLE))
def test_merge_and_unload_equals_peft(case):
    ours, theirs = _pair(case)
    x = _inputs(case)
    with torch.no_grad():
        unmerged = _run(ours, x, case)
        merged_ours = _run(ours.merge_and_unload(), x, case)
        merged_theirs = _run(theirs.merge_and_unload(), x, case)
    assert_close_fp32(merged_ours, unmerged)
    assert_close_fp32(merged_ours, merged_theirs)


@pytest.mark.parametrize("case", ["tied_lora_embedding", "tied_lora_head"])
def test_tied_lora_merges_once_and_keeps_the_tie(case):
    ours, _ = _pair(case)
    x = _inputs(case)
    with torch.no_grad():
        unmerged = _run(ours, x, case)
        merged = ours.merge_and_unload()
        assert_close_fp32(_run(merged, x, case), unmerged)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
