"""LoRA+: B matrices get lr * ratio, as in PEFT's create_loraplus_optimizer."""

import copy

import peft
import pytest
import torch
from conftest import tiny_llama

import lorakit
from lorakit.variants import create_loraplus_optimizer


def test_param_groups_match_peft():
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    base = tiny_llama()
    cfg = dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"])
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**cfg))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    o = create_loraplus_optimizer(ours, lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5)
    t = peft_loraplus(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5)
    summary = lambda opt: sorted((g["lr"], sum(p.numel() for p in g["params"])) for g in opt.param_groups
                                 if g["params"])
    assert summary(o) == summary(t)
    lrs = {g["name"]: g["lr"] for g in o.param_groups}
    assert lrs["B"] == pytest.approx(16 * lrs["A"]) and lrs["embedding"] == 1e-5


def test_training_with_loraplus_ratio(tmp_path, tiny_tokenizer):
    from conftest import tiny_llama_for
    from test_train import _cfg

    from lorakit.train import train

    result = train(_cfg(tmp_path, max_steps=6, loraplus_lr_ratio=8.0), tiny_llama_for(tiny_tokenizer), tiny_tokenizer)
    assert result["history"][-1]["train_loss"] < result["history"][1]["train_loss"]
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be a number > 0"):
        _cfg(tmp_path, loraplus_lr_ratio=-1)
