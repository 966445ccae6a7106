"""The demo fine-tune on the embedded SmolLM2 changes its behaviour (slow: marked integration)."""

import pytest

from lorakit.train.config import TrainConfig
from lorakit.train import train

pytestmark = pytest.mark.integration
SIGNATURE = "Happy trails"
GREETING = "Welcome to Brightwater"


def test_demo_teaches_the_house_style_on_held_out_prompts(tmp_path):
    # A shortened demo (30 steps instead of 33) keeps the suite fast; the full demo is `lorakit train`.
    result = train(TrainConfig(output_dir=str(tmp_path), max_steps=30, eval_every=30, save_every=1000,
                               progress=False))
    evals = [r["eval_loss"] for r in result["history"] if "eval_loss" in r]
    assert evals[-1] < 0.75 * evals[0], evals
    before = [GREETING in a and SIGNATURE in a for a in result["before"]]
    after = [GREETING in a and SIGNATURE in a for a in result["after"]]
    assert len(after) == 10
    assert not any(before), result["before"]
    assert sum(after) >= 8, result["after"]  # the full demo: 10 of 10 (README); 30 steps and other CPUs: margin
