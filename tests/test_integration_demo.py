"""The demo fine-tune on the embedded SmolLM2 changes its behaviour (slow: marked integration)."""

import pytest

from lorakit.train.config import TrainConfig
from lorakit.train import train

pytestmark = pytest.mark.integration
SIGNATURE = "Happy trails"
GREETING = "Welcome to Brightwater"


def test_demo_teaches_the_house_style_on_held_out_prompts(tmp_path):
    # A shortened demo keeps the suite fast: 16 steps at lr 1e-3 instead of 33 at 6e-4 (measured on an AVX2 EPYC:
    # 10/10 in house style, held-out loss 3.06 -> 1.14; 105 s against 167 s for 30 steps). The full demo is
    # `lorakit train`, measured in the README.
    result = train(TrainConfig(output_dir=str(tmp_path), max_steps=16, lr=1e-3, eval_every=16, save_every=1000,
                               progress=False))
    evals = [r["eval_loss"] for r in result["history"] if "eval_loss" in r]
    assert evals[-1] < 0.75 * evals[0], evals
    before = [GREETING in a and SIGNATURE in a for a in result["before"]]
    after = [GREETING in a and SIGNATURE in a for a in result["after"]]
    assert len(after) == 10
    assert not any(before), result["before"]
    assert sum(after) >= 8, result["after"]  # the full demo: 10 of 10 (README); 30 steps and other CPUs: margin
