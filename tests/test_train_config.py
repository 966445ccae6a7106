"""YAML configs and dotted overrides map onto TrainConfig."""

import glob
import os

import pytest

from lorakit.train.config import DEMO_LORA, TrainConfig, load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_the_demo():
    cfg = load_train_config()
    assert cfg == TrainConfig() and cfg.lora == DEMO_LORA and os.path.isfile(cfg.data)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_load_and_point_at_real_files(path):
    cfg = load_train_config(path)
    assert os.path.isfile(cfg.data)
    cfg.lora_config()


def test_demo_yaml_equals_the_no_argument_defaults():
    cfg = load_train_config(os.path.join(ROOT, "configs", "demo.yaml"))
    assert cfg == TrainConfig()


def test_demo_prompts_belong_to_the_demo(tmp_path):
    from lorakit.train.config import DEMO_PROMPTS

    own = tmp_path / "mine.jsonl"
    own.write_text('{"text": "hello"}\n')
    assert TrainConfig().prompts == DEMO_PROMPTS  # the demo: its 10 held-out prompts
    assert TrainConfig(data=str(own)).prompts is None  # your data: no demo prompts, before or after
    assert load_train_config(None, [f"--data={own}"]).prompts is None
    assert TrainConfig(data=str(own), prompts=DEMO_PROMPTS).prompts == DEMO_PROMPTS  # asked for: kept


def test_dotted_overrides_parse_yaml_values():
    cfg = load_train_config(None, ["--lr=5e-4", "--lora.r=32", "--lora.target_modules=[q_proj]", "--bf16=false",
                                   "--prompts=null"])
    assert cfg.lr == 5e-4 and cfg.lora["r"] == 32 and cfg.lora["target_modules"] == ["q_proj"]
    assert cfg.bf16 is False and cfg.prompts is None and cfg.lora["lora_alpha"] == DEMO_LORA["lora_alpha"]


@pytest.mark.parametrize("override,message", [
    ("--batch_size=0", "batch_size must be an integer >= 1"),
    ("--bf16=maybe", "bf16 must be true, false or 'auto'"),
    ("--lr=-1", "lr must be > 0"),
    ("--distributed=horovod", "distributed must be 'ddp' or 'fsdp'"),
    ("--lora.lora_dropout=1.5", r"lora_dropout must be in \[0, 1\)"),
])
def test_bad_values_are_rejected_before_loading_anything(override, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(None, [override])


def test_variant_settings_load_from_overrides():
    from lorakit import AdaLoraConfig, VeraConfig

    ada = load_train_config(None, ["--lora.peft_type=ADALORA", "--lora.init_r=8", "--lora.target_r=4"])
    config = ada.lora_config(total_steps=100)
    assert isinstance(config, AdaLoraConfig) and config.total_step == 100 and config.init_r == 8
    vera = load_train_config(None, ["--lora.peft_type=VERA", "--lora.r=64", "--lora.d_initial=0.2"]).lora_config()
    assert isinstance(vera, VeraConfig) and vera.r == 64 and vera.d_initial == 0.2
    with pytest.raises(ValueError, match="peft_type must be one of"):
        load_train_config(None, ["--lora.peft_type=IA3"])
    with pytest.raises(ValueError, match="target_r"):
        load_train_config(None, ["--lora.peft_type=ADALORA", "--lora.init_r=4", "--lora.target_r=8"])
