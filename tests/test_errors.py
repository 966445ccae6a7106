"""Bad input gets a specific error naming the bad value and what is allowed."""

import json

import pytest
import torch
from conftest import tiny_llama

import lorakit
from lorakit import LoraConfig, get_peft_model


def test_unknown_target_module_lists_closest_names():
    with pytest.raises(ValueError, match=r"'q_prj' not found.*closest module names: \['q_proj'"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_prj"]))


def test_regex_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no module"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=r".*attention\.query"))


def test_target_of_unsupported_type_is_an_error():
    with pytest.raises(ValueError, match="LlamaRMSNorm.*supports only"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["input_layernorm"]))


@pytest.mark.parametrize("kwargs,message", [
    (dict(r=0), "r must be an integer >= 1, got 0"),
    (dict(r=2.5), "r must be an integer >= 1, got 2.5"),
    (dict(rank_pattern={"q_proj": -1}), r"rank_pattern\['q_proj'\] must be an integer >= 1"),
    (dict(lora_alpha=0), "lora_alpha must be a number > 0, got 0"),
    (dict(lora_alpha=-4), "lora_alpha must be a number > 0, got -4"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\), got 1.0"),
    (dict(lora_dropout=-0.1), r"lora_dropout must be in \[0, 1\), got -0.1"),
    (dict(bias="some"), "bias must be one of"),
    (dict(init_lora_weights="xavier"), "init_lora_weights must be one of"),
])
def test_invalid_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(target_modules=["q_proj"], **kwargs)


def _saved(tmp_path, **kwargs):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "k_proj"], **kwargs))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_adapter_with_wrong_shapes_names_module_and_both_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path, r=4)
    weights = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    weights[key] = torch.zeros(48, 4)
    save_file(weights, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"k_proj.lora_B.weight has shape \(48, 4\).*"
                                         r"module 'model.layers.0.self_attn.k_proj' .*expects \(16, 4\)"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), str(path))


def test_failed_load_leaves_base_model_untouched(tmp_path):
    path = _saved(tmp_path, r=4)
    (path / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    base = tiny_llama()
    with pytest.raises(ValueError):
        lorakit.PeftModel.from_pretrained(base, str(path))
    assert not any(isinstance(m, lorakit.LoraLayer) for m in base.modules())


def test_adapter_for_another_model_is_rejected(tmp_path):
    path = _saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]  # file has k_proj tensors the config does not create
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="match no module of this model"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), str(path))


def test_missing_adapter_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    path = _saved(tmp_path / "a")
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), str(path))


def test_corrupt_files(tmp_path):
    path = _saved(tmp_path / "a")
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), str(path))
    path = _saved(tmp_path / "b")
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), str(path))


def test_pickle_weights_load_as_tensors_only_and_code_is_refused_unless_allowed(tmp_path):
    from safetensors.torch import load_file

    path = _saved(tmp_path, r=4)
    weights = load_file(path / "adapter_model.safetensors")
    torch.save(weights, path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()
    model = lorakit.PeftModel.from_pretrained(tiny_llama(), str(path))  # tensors only: as PEFT reads .bin
    assert model.peft_config["default"].r == 4
    key = next(k for k in weights if "lora_B" in k)
    name = key.replace(".weight", ".default.weight")
    torch.testing.assert_close(dict(model.named_parameters())[name], weights[key], rtol=0, atol=0)
    torch.save({**weights, "extra": _NotATensor()}, path / "adapter_model.bin")  # needs full pickle
    with pytest.raises(ValueError, match="allow_pickle=True"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), str(path))


class _NotATensor:
    pass


def test_unknown_adapter_name():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    for call in (lambda: model.set_adapter("nope"), lambda: model.delete_adapter("nope"),
                 lambda: model.merge_adapter(["nope"])):
        with pytest.raises(ValueError, match=r"Adapter nope does not exist; loaded adapters: \['default'\]"):
            call()


def test_duplicate_adapter_name_and_double_wrapping():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"]))


def test_unknown_config_fields_are_kept_with_a_warning(tmp_path):
    path = _saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["future_option"] = 3
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="future_option"):
        model = lorakit.PeftModel.from_pretrained(tiny_llama(), str(path))
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["future_option"] == 3
