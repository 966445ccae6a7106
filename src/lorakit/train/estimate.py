"""What a run will cost, before it starts: trainable parameters and the adapter file's size (exact: the adapter is
injected into a copy of the model built on the meta device, no weights read), the calculator's predicted peak memory
(memory_check), and a short measured probe (`lorakit train` for PROBE_STEPS steps in a child process: seconds per
step and peak resident memory, as the real run's first steps measure them).

The playground's Train view shows these before Start (studio/routes.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from .. import calc
from ..adapters import peft_format
from ..adapters.task_models import get_peft_model
from ..hardware import resolve_bf16, resolve_device_type
from ..models.loading import resolve_model_dir
from .config import TrainConfig
from .memory_check import run_shape

PROBE_STEPS = 3  # step 1 warms up (first-call allocations, the dtype probe when not cached); 2.. are the steady rate
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def meta_adapter_model(cfg: TrainConfig):
    """The run's base with its adapter injected, every tensor on the meta device (shapes only, nothing read)."""
    config = AutoConfig.from_pretrained(resolve_model_dir(cfg.model))
    auto = {"causal_lm": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
            "seq_cls": AutoModelForSequenceClassification}[cfg.task]
    with torch.device("meta"):
        base = auto.from_config(config)
        return get_peft_model(base, cfg.lora_config(total_steps=max(cfg.max_steps, 1)))


def safetensors_bytes(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """The size of a safetensors file holding tensors of these shapes and dtypes (with {"format": "pt"} metadata,
    as write_adapter writes it): 8 bytes of header length, the JSON header padded to 8 bytes, the data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(shapes):
        shape, dtype = shapes[name]
        size = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES.get(dtype, str(dtype)), "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text)) % 8 + offset


def adapter_size(cfg: TrainConfig) -> dict:
    """Trainable parameters and the adapter_model.safetensors size, counted on the meta-device model."""
    model = meta_adapter_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.peft_config["default"]
    state = peft_format.adapter_state_dict(model.model, "default", config, "auto")
    shapes = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    return {"trainable_parameters": int(trainable), "adapter_bytes": safetensors_bytes(shapes),
            "saved_tensors": len(state)}


def predicted_memory(cfg: TrainConfig) -> dict:
    """The calculator's predicted peak (GB, by component) for this run at its max_length."""
    resolved = dataclasses.replace(cfg, bf16=resolve_bf16(cfg.bf16, resolve_device_type(cfg.device)))
    return calc.predict_run(calc.get_arch(resolve_model_dir(cfg.model)), run_shape(resolved))


def probe(cfg: TrainConfig, steps: int = PROBE_STEPS, timeout_s: float = 600) -> dict:
    """Run `lorakit train` for `steps` steps on the run's own data and settings, in a child process and a
    temporary directory (no prompts answered, no held-out evaluation): seconds per step (the mean of steps 2..),
    tokens per second and peak resident memory, as measured there. Raises RuntimeError with the child's last
    output lines when it fails."""
    with tempfile.TemporaryDirectory(prefix="lorakit-probe-") as tmp:
        path = os.path.join(tmp, "probe.yaml")
        dataclasses.replace(cfg, output_dir=os.path.join(tmp, "run"), max_steps=steps, prompts=None, val_fraction=0.0,
                            eval_data=None, eval_every=10 ** 6, save_every=10 ** 6, progress=False,
                            memory_check=False).save_yaml(path)
        done = subprocess.run([sys.executable, "-m", "lorakit", "train", path], capture_output=True, text=True,
                              timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-6:])
            raise RuntimeError(f"the probe run failed (exit {done.returncode}): {tail}")
        with open(os.path.join(tmp, "run", "metrics.jsonl")) as f:
            records = [r for r in map(json.loads, f) if "train_loss" in r]
    later = records[1:] or records
    seconds = (later[-1]["elapsed_s"] - (records[0]["elapsed_s"] if len(records) > 1 else 0)) / len(later)
    return {"seconds_per_step": seconds, "tokens_per_s": later[-1]["tokens_per_s"],
            "peak_memory_gb": max(r["peak_memory_gb"] for r in records), "steps": len(records)}


def estimate(cfg: TrainConfig, measure: bool = False) -> dict:
    """Everything the Train view shows before Start; `measure` adds the probe's figures."""
    result = {**adapter_size(cfg), "predicted_memory_gb": predicted_memory(cfg)}
    if measure:
        result["probe"] = probe(cfg)
    return result
