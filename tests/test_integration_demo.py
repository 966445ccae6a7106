"""The demo fine-tune on the embedded SmolLM2 changes its behaviour (slow: marked integration)."""

import pytest
import torch

from lorakit.generation import answer_prompts
from lorakit.models.loading import load_model, load_tokenizer
from lorakit.train import train
from lorakit.train.config import DEMO_PROMPTS, TrainConfig

pytestmark = pytest.mark.integration
SIGNATURE = "Happy trails"
GREETING = "Welcome to Brightwater"


def test_demo_teaches_the_house_style_on_held_out_prompts(tmp_path):
    # A shortened demo keeps the suite fast: 16 steps at lr 1e-3 instead of 33 at 6e-4 (measured on an AVX2 EPYC:
    # 10/10 in house style, held-out loss 3.06 -> 1.14). The full demo is `lorakit train`
    # (measured in docs/get-started/demo.md).
    # The base model's answers are generated here for 24 tokens only: the house style opens with the greeting, which
    # the base model never writes (the after-answers take the run's full 128; the summary's own before/after
    # answers are checked on a tiny model in test_train.py). 115 s against 151 s when train() answered both (same run).
    with open(DEMO_PROMPTS) as f:
        prompts = [line.strip() for line in f if line.strip()]
    tokenizer, model = load_tokenizer("smollm2-135m"), load_model("smollm2-135m", dtype=torch.float32)
    before = answer_prompts(model, tokenizer, prompts, max_new_tokens=24)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=16, lr=1e-3, eval_every=16, save_every=1000,
                      progress=False, prompts=None)
    result = train(cfg, model, tokenizer)
    after = answer_prompts(result["model"], tokenizer, prompts, max_new_tokens=cfg.max_new_tokens)
    evals = [r["eval_loss"] for r in result["history"] if "eval_loss" in r]
    assert evals[-1] < 0.75 * evals[0], evals
    assert len(prompts) == 10 and not any(GREETING in a for a in before), before
    in_style = [GREETING in a and SIGNATURE in a for a in after]
    assert sum(in_style) >= 8, after  # the full demo: 10 of 10 (docs); 30 steps and other CPUs: margin
