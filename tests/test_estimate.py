"""The Train view's estimates (train/estimate.py) against what the run then does: trainable parameters and the
adapter file's bytes exact for every adapter form (counted on a meta-device model, compared with the run's saved
adapter_model.safetensors), and on the embedded SmolLM2 (integration) the probe's peak memory within 20 % of the
measured run's, its time per step measured."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_train_config
from safetensors import safe_open

from lorakit.train.config import DEMO_DATA, TrainConfig
from lorakit.train.estimate import adapter_size, estimate, safetensors_bytes

VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}, "vera": {"peft_type": "VERA"}}


def _saved(adapter_dir):
    """(numbers stored, file bytes) of an adapter directory's adapter_model.safetensors."""
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    with safe_open(path, "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()), os.path.getsize(path)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameters_and_adapter_bytes_are_exactly_what_the_run_saves(variant, serve_model_dir, tiny_tokenizer,
                                                                     tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.train import train

    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **VARIANTS[variant]}
    cfg = tiny_train_config(tmp_path / "run", model=serve_model_dir, max_steps=2, lora=lora)
    predicted = adapter_size(cfg)
    result = train(cfg, AutoModelForCausalLM.from_pretrained(serve_model_dir), tiny_tokenizer)
    trainable = sum(p.numel() for p in result["model"].parameters() if p.requires_grad)
    saved_numel, saved_bytes = _saved(result["adapter_dir"])
    assert predicted["trainable_parameters"] == trainable
    assert predicted["adapter_bytes"] == saved_bytes
    assert saved_numel >= trainable  # VeRA also saves its frozen shared projections


def test_safetensors_size_formula_matches_the_library(tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {"a.weight": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.bfloat16), "c.lora_A": torch.zeros(1)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    assert safetensors_bytes(shapes) == os.path.getsize(tmp_path / "x.safetensors")


@pytest.mark.integration
def test_estimates_before_start_match_the_measured_run_on_the_embedded_model(tmp_path):
    settings = dict(data=DEMO_DATA, prompts=None, max_steps=5, batch_size=4, max_length=128, eval_every=100,
                    progress=False, output_dir=str(tmp_path / "run"),
                    lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    cfg = TrainConfig(**settings)
    before = estimate(cfg, measure=True)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(settings))
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", str(config), "--quiet"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [r for r in map(json.loads, f) if "train_loss" in r]
    measured_peak = max(r["peak_memory_gb"] for r in records)
    saved_numel, saved_bytes = _saved(tmp_path / "run" / "adapter")
    assert before["trainable_parameters"] == saved_numel == 30 * 8 * (576 + 576 + 576 + 192 + 576 + 192 + 576 + 576)
    assert abs(before["adapter_bytes"] - saved_bytes) <= 0.05 * saved_bytes
    probe = before["probe"]
    assert abs(probe["peak_memory_gb"] - measured_peak) <= 0.2 * measured_peak, (probe, measured_peak)
    assert probe["seconds_per_step"] > 0 and probe["steps"] == 3
    print(f"\nestimate vs run: peak {probe['peak_memory_gb']:.2f} GB (probe) / "
          f"{before['predicted_memory_gb']['total']:.2f} GB (calculator) vs {measured_peak:.2f} GB measured; "
          f"{probe['seconds_per_step']:.2f} s/step (probe) vs "
          f"{(records[-1]['elapsed_s'] - records[0]['elapsed_s']) / (len(records) - 1):.2f} s/step measured")
