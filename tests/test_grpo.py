"""GRPO (`method: grpo`): loss and gradients against TRL's GRPOTrainer on the same model, adapter weights and
completions; the pure arithmetic in float64; reward functions and their errors; runs, resume, bad input."""

import json
import math
import os
import sys
import warnings

import pytest
import torch
from conftest import assert_close_fp32, copy_adapters_to_peft, randomize_adapters, tiny_llama_for

import lorakit
from lorakit.train import grpo_loss as G
from lorakit.train.config import TrainConfig
from lorakit.train.grpo import GRPO, Completion, completion_batch, encode_prompt, load_prompt_examples
from lorakit.train.rewards import RewardError, exact_answer, format_match, load_rewards, score

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[{"role": "user", "content": "Do you rent tents?"}], [{"role": "user", "content": "What is a carabiner?"}]]
GENERATIONS = 4


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def length_reward(completions, **kwargs):
    """A reward that differs within each group: the completion's length in characters, mod 7."""
    return [float(len(c[0]["content"]) % 7) for c in completions]


def _fixed_completions(tokenizer):
    """Completions of several lengths, most ending with the EOS token (one truncated), as token ids."""
    texts = ["Yes, by the weekend.", "Yes.", "We rent two-person tents by the day and the weekend, with poles",
             "No", "A metal loop with a spring gate.", "A loop.", "Climbers use it to clip ropes.", "Metal"]
    eos = tokenizer.eos_token_id
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + ([] if i == 2 else [eos])
            for i, t in enumerate(texts)]


def _trl_trainer(tokenizer, tmp_path, completions, **args):
    import peft
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompt_ids = [encode_prompt(p, tokenizer) for p in PROMPTS]

    def rollout(prompts, trainer):  # sampling replaced by the given token ids (one call: one generation batch)
        index = [PROMPTS.index(p) for p in prompts]
        return {"prompt_ids": [prompt_ids[i] for i in index], "completion_ids": completions, "logprobs": None}

    config = GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, num_generations=GENERATIONS,
                        per_device_train_batch_size=len(completions), max_completion_length=24, temperature=0.9, bf16=False,
                        **args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=tiny_llama_for(tokenizer).double(), reward_funcs=[length_reward, format_match],
                              args=config, train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                              processing_class=tokenizer, rollout_func=rollout,
                              peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_and_gradients_equal_trl(tmp_path, tiny_tokenizer, loss_type, beta):
    """Real TRL GRPOTrainer + real PEFT, the same base, adapter weights (non-zero, copied) and completions: the
    advantages (from TRL's reward pipeline vs ours), the loss, entropy, KL and every adapter gradient within 1e-5
    relative (of the largest value of each gradient). Both models are float64, so lorakit's side carries no
    rounding; TRL's fused head still computes log-probs in fp32 whatever the model dtype (measured: |Δ logp| ~6e-7),
    which is the error left (~1e-6 of the gradients)."""
    completions = _fixed_completions(tiny_tokenizer)
    trainer = _trl_trainer(tiny_tokenizer, tmp_path, completions, loss_type=loss_type, beta=beta, epsilon=0.2,
                           epsilon_high=0.28)
    ours = lorakit.get_peft_model(tiny_llama_for(tiny_tokenizer).double(),
                                  lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).double()
    randomize_adapters(ours, scale=0.2)
    copy_adapters_to_peft(ours, trainer.model)
    ours.train()
    trainer.model.train()
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(GENERATIONS)])
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    cfg = TrainConfig(method="grpo", rewards=["test_grpo:length_reward", "format_match"], batch_size=8,
                      num_generations=GENERATIONS, max_completion_length=24, temperature=0.9, loss_type=loss_type,
                      beta=beta, epsilon=0.2, epsilon_high=0.28, bf16=False, output_dir=str(tmp_path / "ours"))
    grpo = GRPO(cfg, ours, tiny_tokenizer, load_rewards(cfg.rewards), "cpu")
    prompt_ids = [encode_prompt(p, tiny_tokenizer) for p in PROMPTS]
    repeated = [p for p in PROMPTS for _ in range(GENERATIONS)]
    texts = [[{"role": "assistant", "content": tiny_tokenizer.decode(c, skip_special_tokens=True)}]
             for c in completions]
    per_func = score(grpo.rewards, repeated, texts, completions, {})
    advantages, _ = G.group_advantages(G.total_rewards(per_func, grpo.weights), GENERATIONS, "group")
    torch.testing.assert_close(advantages.float(), inputs["advantages"], rtol=1e-5, atol=1e-6)
    grpo.rollouts = [[Completion(prompt_ids[i // GENERATIONS], c, float(a))
                      for i, (c, a) in enumerate(zip(completions, advantages.tolist()))]]
    grpo._reference_and_old_logps()
    loss, sums = grpo.micro_batch_loss(grpo.rollouts[0], grpo.completion_tokens())
    loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert sums["entropy"] / sums["tokens"] == pytest.approx(trl_metrics["entropy"], rel=1e-5)
    if beta:
        assert sums["kl"] / sums["tokens"] == pytest.approx(trl_metrics["kl"], rel=1e-5)
    ours_grads, trl_grads = _grads(ours), _grads(trainer.model)
    assert ours_grads.keys() == trl_grads.keys() and len(ours_grads) == 28
    assert max(g.abs().max() for g in trl_grads.values()) > 0  # the rewards differ within groups: a signal
    for name, grad in trl_grads.items():
        assert_close_fp32(ours_grads[name], grad, name, rel=1e-5)


def test_group_advantages_equal_a_float64_reference_in_each_scaling():
    rewards = torch.tensor([1.0, 2.0, 4.0, 7.0, 3.0, 3.0, 3.0, 3.0, 0.5, float("nan"), 1.5, 2.5], dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        got, zero = G.group_advantages(rewards, 4, scale)
        expected = []
        finite = [r for r in rewards.tolist() if not math.isnan(r)]
        batch_mean = sum(finite) / len(finite)
        batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in finite) / (len(finite) - 1))
        for g in range(3):
            group = [r for r in rewards[4 * g:4 * g + 4].tolist()]
            values = [r for r in group if not math.isnan(r)]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((r - mean) ** 2 for r in values) / (len(values) - 1))
            scale_by = {"group": std + 1e-4, "batch": batch_std + 1e-4, "none": 1.0}[scale]
            expected += [0.0 if math.isnan(r) else (r - mean) / scale_by for r in group]
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        if scale != "batch":
            assert zero.tolist() == [False] * 4 + [True] * 4 + [False] * 4  # the all-3 group has no signal


def test_dapo_normalises_by_the_steps_tokens_so_micro_batches_sum_to_the_token_mean():
    torch.manual_seed(0)
    per_token = torch.randn(6, 5, dtype=torch.float64)
    mask = (torch.rand(6, 5) > 0.3).double()
    whole = (per_token * mask).sum() / mask.sum()
    parts = sum(G.reduce_loss(per_token[i:i + 2], mask[i:i + 2], "dapo", 3, 5, float(mask.sum())) for i in (0, 2, 4))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12)
    grpo = G.reduce_loss(per_token, mask, "grpo", 1, 5, 0.0)
    rows = [(per_token[i] * mask[i]).sum() / max(mask[i].sum(), 1) for i in range(6)]
    assert grpo.item() == pytest.approx(sum(rows).item() / 6, rel=1e-12)
    dr = G.reduce_loss(per_token, mask, "dr_grpo", 2, 5, 0.0)
    assert dr.item() == pytest.approx((per_token * mask).sum().item() / (6 * 5) / 2, rel=1e-12)


def test_builtin_rewards():
    completions = ["The sum is <answer>12</answer>", "<answer> 7 </answer>", "12", "I think 3, no wait, 12", "none"]
    assert format_match(None, completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert exact_answer(None, completions, answer=["12", "8", "12", "12", "1"]) == [1.0, 0.0, 1.0, 1.0, 0.0]
    chat = [[{"role": "assistant", "content": c}] for c in completions]
    assert format_match(None, chat) == format_match(None, completions)
    rewards = load_rewards(["format_match", {"name": "length_target", "target": 4, "weight": 0.5}])
    assert [(r.name, r.weight, r.options) for r in rewards] == [("format_match", 1.0, {}),
                                                                ("length_target", 0.5, {"target": 4})]
    got = score(rewards, ["p"] * 2, ["<answer>1</answer>", "x"], [[1, 2, 3, 4], [1, 2]], {})
    assert got.tolist() == [[1.0, 1.0], [0.0, 0.5]]


def even_tokens(completions, completion_ids, **kwargs):
    """Varies from completion to completion even on a random model: the share of even token ids."""
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


CALLS = {"n": 0}  # the bad rewards below score normally for two steps (one call each), then fail


def _healthy(completions) -> bool:
    CALLS["n"] += 1
    return CALLS["n"] <= 2


def bad_length(completions, **kwargs):
    return [0.0] * len(completions) if _healthy(completions) else [1.0] * (len(completions) - 1)


def bad_nan(completions, **kwargs):
    return [0.0] * len(completions) if _healthy(completions) else \
        [float("nan") if i == 2 else 0.0 for i in range(len(completions))]


def bad_raises(prompts, completions, **kwargs):
    if _healthy(completions):
        return [0.0] * len(completions)
    raise ZeroDivisionError("division by zero")


def bad_raises_on_row(prompts, completions, number, **kwargs):
    return [0.0] * len(completions) if _healthy(completions) or len(completions) == 1 and number[0] else \
        [1.0 / n for n in number]


def _grpo_config(tmp_path, data, **kw):
    base = dict(data=data, prompts=None, output_dir=str(tmp_path / "run"), method="grpo", rewards=["format_match"],
                max_length=48, batch_size=8, num_generations=4, max_completion_length=8, max_steps=4, lr=5e-3,
                warmup_steps=1, eval_every=100, save_every=2, bf16=False, progress=False, memory_check=False,
                lora=dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    base.update(kw)
    return TrainConfig(**base)


def _prompt_rows(n=12):
    return [{"prompt": [{"role": "user", "content": f"What is {i} plus {i % 3}?"}], "answer": str(i + i % 3),
             "number": i % 4} for i in range(n)]


@pytest.mark.parametrize("rewards,message", [
    (["no_such_module_xyz:fn"], "cannot import module 'no_such_module_xyz'"),
    (["lorakit.train.rewards:nothing_here"], "has no function 'nothing_here'"),
    (["just_a_word"], "a user reward is 'module.path:function'"),
    ([], "needs rewards: a non-empty list"),
])
def test_unknown_reward_is_refused_when_the_config_is_made(tmp_path, rewards, message):
    with pytest.raises(RewardError, match=message):
        _grpo_config(tmp_path, "unused.jsonl", rewards=rewards)


@pytest.mark.parametrize("settings,message", [
    (dict(num_generations=1), "num_generations must be an integer >= 2"),
    (dict(num_generations=3), "must be a multiple of num_generations=3"),
    (dict(loss_type="sigmoid"), "loss_type for method: grpo must be one of"),
    (dict(scale_rewards="row"), "scale_rewards must be one of"),
    (dict(temperature=0.0), "temperature > 0"),
])
def test_bad_grpo_settings_are_refused_naming_the_value(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        _grpo_config(tmp_path, "unused.jsonl", **settings)


def test_empty_or_malformed_prompt_files_are_one_error_naming_the_file(tmp_path, tiny_tokenizer):
    from lorakit.train.data import DataError

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompt_examples(str(empty), tiny_tokenizer, 48)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: a GRPO row needs \"prompt\""):
        load_prompt_examples(_write(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"question": "no"}]), tiny_tokenizer,
                             48)


@pytest.mark.parametrize("reward,message", [
    ("test_grpo:bad_length", r"bad_length returned 7 values for 8 completions"),
    ("test_grpo:bad_nan", r"bad_nan returned nan for completion 2 \(prompt .*\): rewards must be finite"),
    ("test_grpo:bad_raises", r"bad_raises raised ZeroDivisionError"),
    ("test_grpo:bad_raises_on_row", r"bad_raises_on_row raised ZeroDivisionError: .* on completion \d+ \(prompt "
                                    r"'What is (0|4|8) plus"),
])
def test_a_failing_reward_stops_the_run_naming_it_and_the_checkpoint_stays(tmp_path, tiny_tokenizer, reward,
                                                                           message):
    """The run checkpoints at step 2, then the reward fails from step 3 on (a step counter in the function's
    module): one RewardError naming the function (and the row), the step-2 checkpoint byte for byte intact, no
    adapter written."""
    from lorakit.train.loop import train

    data = _write(tmp_path / "p.jsonl", _prompt_rows())
    CALLS["n"] = 0
    cfg = _grpo_config(tmp_path, data, rewards=[reward], val_fraction=0.0)
    checkpoint = os.path.join(cfg.output_dir, "checkpoint.pt")
    snapshot = {}

    def on_step(step, record):
        if step == 2:
            snapshot["bytes"] = open(checkpoint, "rb").read()

    with pytest.raises(RewardError, match=message):
        train(cfg, model=tiny_llama_for(tiny_tokenizer), tokenizer=tiny_tokenizer, on_step=on_step)
    assert open(checkpoint, "rb").read() == snapshot["bytes"]
    assert not os.path.exists(os.path.join(cfg.output_dir, "adapter"))
    assert [name for name in os.listdir(cfg.output_dir) if name.startswith(".") or name.endswith(".tmp")] == []


@pytest.mark.parametrize("settings", [dict(num_iterations=2, beta=0.04, loss_type="grpo"), dict()])
def test_resume_mid_run_continues_bit_exact(tmp_path, tiny_tokenizer, settings):
    """6 steps straight vs stopped after step 3 (inside a reused rollout batch when num_iterations=2) and resumed:
    every step's rewards, losses and gradient norms, and the final adapter, are identical."""
    from safetensors.torch import load_file

    from lorakit.train.loop import train

    data = _write(tmp_path / "p.jsonl", _prompt_rows())
    rewards = ["test_grpo:even_tokens", {"name": "length_target", "target": 5}]
    whole = _grpo_config(tmp_path, data, rewards=rewards, max_steps=6, save_every=100, temperature=1.3,
                         output_dir=str(tmp_path / "whole"), **settings)
    straight = train(whole, model=tiny_llama_for(tiny_tokenizer), tokenizer=tiny_tokenizer)["history"]

    def stop_at_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    parts = dict(rewards=rewards, max_steps=6, save_every=100, temperature=1.3, output_dir=str(tmp_path / "parts"),
                 **settings)
    first = train(_grpo_config(tmp_path, data, **parts), model=tiny_llama_for(tiny_tokenizer),
                  tokenizer=tiny_tokenizer, on_step=stop_at_3)
    assert first["interrupted"] and first["steps"] == 3
    resumed = train(_grpo_config(tmp_path, data, resume=True, **parts), model=tiny_llama_for(tiny_tokenizer),
                    tokenizer=tiny_tokenizer)["history"]
    drop = ("tokens_per_s", "elapsed_s", "rollout_s", "update_s", "peak_memory_gb")  # measurements
    strip = lambda h: [{k: v for k, v in r.items() if k not in drop} for r in h]  # noqa: E731
    assert strip(resumed) == strip(straight)
    assert len({r["reward_std"] for r in straight if "reward_std" in r}) > 1  # rewards vary: a real comparison
    a = load_file(os.path.join(tmp_path, "whole", "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(tmp_path, "parts", "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(os.path.join(tmp_path, "whole", "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    names = set(logged[-1])
    assert {"reward", "reward_std", "rewards/test_grpo:even_tokens/mean", "rewards/length_target/mean", "entropy",
            "clip_ratio/region_mean", "completions/mean_length", "frac_reward_zero_std", "train_loss"} <= names
    assert ("kl" in names) == bool(settings.get("beta"))
