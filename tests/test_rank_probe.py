"""suggest_rank_pattern: the budget is respected and goes where the loss is sensitive."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.train.rank_probe import allocate, suggest_rank_pattern


class TwoBranches(nn.Module):
    """The loss depends on `used` only; `ignored` feeds a term multiplied by zero."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(16, 16)
        self.ignored = nn.Linear(16, 16)

    def forward(self, x, y):
        out = self.used(x) + 0.0 * self.ignored(x)
        return SimpleNamespace(loss=((out - y) ** 2).mean())


def test_budget_goes_to_the_layer_the_loss_depends_on():
    torch.manual_seed(0)
    model = TwoBranches()
    x = torch.randn(64, 16)
    batches = [{"x": x, "y": x @ torch.randn(16, 16)}]
    budget = 10 * 32  # ten rank-1 directions of a 16x16 matrix (d_in + d_out = 32 each)
    ranks = suggest_rank_pattern(model, budget, batches, ["used", "ignored"], max_rank=12, probe_steps=6)
    assert ranks == {"used": 9, "ignored": 1}
    assert all(not n.startswith("lora") for n, _ in model.named_parameters())  # the model is untouched
    peft_model = get_peft_model(model, LoraConfig(r=1, target_modules=["used", "ignored"], rank_pattern=ranks))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == budget


def test_allocate_is_greedy_and_refuses_an_impossible_budget():
    scores = {"a": torch.tensor([3.0, 2.0, 1.0]), "b": torch.tensor([5.0, 0.5, 0.1])}
    assert allocate(scores, {"a": 10, "b": 10}, 50) == {"a": 3, "b": 2}
    assert allocate(scores, {"a": 10, "b": 40}, 70) == {"a": 3, "b": 1}  # b's next rank does not fit
    with pytest.raises(ValueError, match="below rank 1"):
        allocate(scores, {"a": 10, "b": 10}, 15)


def test_cli_writes_a_training_config_with_the_rank_pattern(tmp_path, tiny_model_dir):
    out = tmp_path / "ranks.yaml"
    proc = subprocess.run([sys.executable, "-m", "lorakit", "suggest-ranks", "--model", tiny_model_dir,
                           "--budget", "3000", "--targets", "q_proj,v_proj", "--max-rank", "8", "--steps", "3",
                           "--max-length", "64", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["parameters"] <= 3000 and len(report["rank_pattern"]) == 4
    import yaml
    written = yaml.safe_load(out.read_text())["lora"]  # a training config: these targets, at these ranks
    assert written["rank_pattern"] == report["rank_pattern"]
    assert written["target_modules"] == sorted(report["rank_pattern"])


def test_cli_refuses_a_budget_below_rank_1_in_one_line(tiny_model_dir, capsys):
    from lorakit.cli import main  # in this process: the process-level behaviour is checked above (a start is ~8 s)

    code = main(["suggest-ranks", "--model", tiny_model_dir, "--budget", "10", "--targets", "q_proj"])
    err = capsys.readouterr().err
    assert code == 2 and "below rank 1" in err and "Traceback" not in err, err
