"""Preference training (DPO, IPO, ORPO): losses, rewards and gradients against TRL's trainers on the same model,
adapter weights and batch; the disabled-adapter reference; the data files; runs end to end."""

import json
import math
import os
import warnings

import pytest
import torch
from conftest import assert_close_fp32, copy_adapters_to_peft, randomize_adapters, tiny_llama_for, tiny_train_config

import lorakit
from lorakit.train.preference_data import (PreferenceExample, collate_pairs, load_preference_examples, split_prompt,
                                          tokenize_pair)
from lorakit.train.preference_loss import PreferenceLoss, token_logps

DEMO_PAIRS = os.path.join(os.path.dirname(lorakit.__file__), "data", "demo_preferences.jsonl")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


CONVERSATIONAL = [
    {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
     "rejected": [{"role": "assistant", "content": r}]}
    for q, c, r in [("What tent should I buy?", "Welcome! A light two-person tent. Happy trails!",
                     "Tents vary a lot and there are many things to consider."),
                    ("Do you rent gear?", "Yes, by the weekend. Happy trails!", "Maybe."),
                    ("What is a carabiner?", "A metal loop with a spring gate.", "A thing climbers use, probably.")]]


def _trl(kind, tokenizer, tmp_path, rows, **args):
    """TRL's trainer over a fresh equal base with a PEFT LoRA (weights copied in afterwards by the caller)."""
    import peft
    from datasets import Dataset

    if kind == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    config = Config(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=256, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trainer(model=tiny_llama_for(tokenizer), args=config, train_dataset=Dataset.from_list(rows),
                       processing_class=tokenizer, peft_config=peft.LoraConfig(r=4, lora_alpha=8,
                                                                               target_modules=TARGETS))


def _ours(tokenizer, trainer):
    """A lorakit LoRA on an equal base, non-zero adapter weights, copied into TRL's PEFT model."""
    ours = lorakit.get_peft_model(tiny_llama_for(tokenizer), lorakit.LoraConfig(r=4, lora_alpha=8,
                                                                                 target_modules=TARGETS))
    randomize_adapters(ours, scale=0.2)
    copy_adapters_to_peft(ours, trainer.model)
    ours.train()
    trainer.model.train()
    return ours


def _compare(ours_loss, ours_metrics, ours_model, trl_loss, trl_metrics, trl_model):
    """Loss and every metric within 1e-5 relative; a reward is β x (a difference of two log-prob sums of
    magnitude |logps| ~ 120, each an fp32 sum of ~50 terms), so its rounding is 1e-5 of β·|logps|, not of itself
    (the same for ORPO's log odds, differences of the averages).
    Gradients by the fp32 rule of conftest (1e-4 of the largest gradient)."""
    assert ours_loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    logps_scale = max(abs(trl_metrics["logps/chosen"]), abs(trl_metrics["logps/rejected"]))
    for name, value in ours_metrics.items():  # ORPO's log odds are likewise differences of log-prob averages
        scale = 0.1 * logps_scale if name.startswith("rewards/") else max(abs(trl_metrics[name]), logps_scale)
        assert value == pytest.approx(trl_metrics[name], abs=1e-5 * scale + 1e-7), name
    ours_grads, trl_grads = _grads(ours_model), _grads(trl_model)
    assert ours_grads.keys() == trl_grads.keys() and len(ours_grads) == 28
    for name, grad in trl_grads.items():
        assert_close_fp32(ours_grads[name], grad, name)


@pytest.mark.parametrize("loss_type,sft_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.7),
                                                  ("robust", 0.0), ("hinge", 0.0)])
@pytest.mark.parametrize("fused", [True, False])
def test_dpo_loss_rewards_and_gradients_equal_trl(tmp_path, tiny_tokenizer, loss_type, sft_weight, fused):
    """DPO (sigmoid), IPO, RPO (sigmoid + sft_weight x NLL), rDPO (robust, label_smoothing 0.2) and hinge."""
    smoothing = 0.2 if loss_type == "robust" else 0.0
    trl_types = dict(loss_type=[loss_type, "sft"], loss_weights=[1.0, sft_weight]) if sft_weight else \
        dict(loss_type=[loss_type])
    trainer = _trl("dpo", tiny_tokenizer, tmp_path, CONVERSATIONAL, beta=0.1, label_smoothing=smoothing, **trl_types)
    examples, _ = load_preference_examples(_write(tmp_path / "pairs.jsonl", CONVERSATIONAL), tiny_tokenizer, 256)
    for ours, theirs in zip(examples, trainer.train_dataset, strict=True):  # TRL's tokenization, token for token
        assert (ours.prompt_ids, ours.chosen_ids, ours.rejected_ids) == \
            (theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"])
    ours = _ours(tiny_tokenizer, trainer)
    batch = collate_pairs(examples, tiny_tokenizer.pad_token_id)
    trl_loss = trainer._compute_loss(trainer.model, {k: v for k, v in batch.items()}, False)
    trl_loss.backward()
    module = PreferenceLoss(ours, "dpo", beta=0.1, loss_type=loss_type, label_smoothing=smoothing,
                            sft_weight=sft_weight, fused=fused)
    loss = module(**batch) / 3
    loss.backward()
    metrics = {name: value / 3 for name, value in module.take_metrics().items()}
    metrics.pop("nll_loss", None)  # TRL's DPOTrainer does not log the sft term
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected"}
    _compare(loss, metrics, ours, trl_loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}, trainer.model)


@pytest.mark.parametrize("fused", [True, False])
def test_orpo_loss_rewards_and_gradients_equal_trl(tmp_path, tiny_tokenizer, fused):
    trainer = _trl("orpo", tiny_tokenizer, tmp_path, CONVERSATIONAL, beta=0.1)
    rows = [trainer.train_dataset[i] for i in range(len(CONVERSATIONAL))]
    # TRL's ORPO (experimental) tokenizes its own way (an EOS after the template's end): the same batch is its ids
    examples = [PreferenceExample(r["prompt_input_ids"], r["chosen_input_ids"][len(r["prompt_input_ids"]):],
                                  r["rejected_input_ids"][len(r["prompt_input_ids"]):]) for r in rows]
    ours = _ours(tiny_tokenizer, trainer)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(rows))
    trl_loss.backward()
    module = PreferenceLoss(ours, "orpo", orpo_lambda=0.1, fused=fused)
    loss = module(**collate_pairs(examples, tiny_tokenizer.pad_token_id)) / 3
    loss.backward()
    metrics = {name: value / 3 for name, value in module.take_metrics().items()}
    assert {"rewards/accuracies", "rewards/margins", "nll_loss", "log_odds_ratio"} <= set(metrics)
    _compare(loss, metrics, ours, trl_loss, trl_metrics, trainer.model)


def test_reference_is_the_base_model_bit_for_bit_with_the_adapter_switched_off(tiny_tokenizer):
    """The reference log-probs come from the adapted model under disable_adapter(): bit-equal (fp32) to the same
    base without any adapter injected, so no second copy of the base is needed."""
    import copy

    base = tiny_llama_for(tiny_tokenizer)
    plain = copy.deepcopy(base).requires_grad_(False)  # frozen, as a base is (the fused head needs that)
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_adapters(model, scale=0.2)
    examples = [tokenize_pair(*split_prompt(row), tiny_tokenizer) for row in CONVERSATIONAL]
    batch = collate_pairs(examples, tiny_tokenizer.pad_token_id)
    for fused in (True, False):
        module = PreferenceLoss(model, "dpo", fused=fused)
        selected = [batch["completion_mask"][:, 1:].bool()]
        reference = module.reference_logps(**batch)
        with torch.no_grad():  # the same computation as the reference's (the fused head forms no gradient)
            expected = token_logps(plain, batch["input_ids"], batch["attention_mask"], selected, fused)[0]
        assert torch.equal(reference, expected)
        adapted = token_logps(model, batch["input_ids"], batch["attention_mask"], selected, fused)[0]
        assert (adapted - reference).abs().min() > 1e-3  # the adapter is on again afterwards, and matters
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_dpo_run_raises_held_out_reward_accuracy_and_logs_trl_metric_names(tmp_path, tiny_tokenizer):
    from lorakit.train import train

    result = train(tiny_train_config(tmp_path, method="dpo", data=DEMO_PAIRS, max_steps=20, eval_every=10, lr=1e-2,
                                     val_fraction=0.1), tiny_llama_for(tiny_tokenizer), tiny_tokenizer)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1:]  # settings
    first, last = records[0], records[-1]
    assert first["step"] == 0 and first["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapter = reference
    assert first["eval_rewards/margins"] == 0 and first["eval_rewards/accuracies"] == 0
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert name in records[1] and f"eval_{name}" in last, name
    assert records[1]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1 starts at the reference
    assert last["eval_rewards/accuracies"] >= 0.9 and last["eval_rewards/margins"] > 0.1, last
    assert last["eval_loss"] < 0.6
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists() and (tmp_path / "loss.png").exists()
    assert result["steps"] == 20


GOOD = {"prompt": "Q: tent?\nA:", "chosen": " A light one.", "rejected": " Tents vary a lot."}
BAD_ROWS = [
    ({"prompt": "Q?", "chosen": " yes"}, r"missing field\(s\) \['rejected'\]"),
    ({"prompt": "Q?", "chosen": " same", "rejected": " same"}, "chosen and rejected are identical"),
    ({"prompt": "Q?", "chosen": "  ", "rejected": " no"}, "empty response: chosen has no text"),
    ({"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": ""}],
      "rejected": [{"role": "assistant", "content": "no"}]}, "empty response: chosen has no assistant message"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "share no leading message"),
    ({"prompt": 3, "chosen": " a", "rejected": " b"}, "'prompt' must be a string"),
    (["not", "an", "object"], "expected a JSON object"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_a_bad_preference_row_is_one_line_naming_file_and_line_and_nothing_is_written(tmp_path, tiny_tokenizer, row,
                                                                                        message):
    from lorakit.train import train
    from lorakit.train.data import DataError

    data = _write(tmp_path / "pairs.jsonl", [GOOD, GOOD, row, GOOD])
    out = tmp_path / "run"
    with pytest.raises(DataError, match=rf"^{data}:3: .*{message}") as caught:
        train(tiny_train_config(out, method="dpo", data=data), tiny_llama_for(tiny_tokenizer), tiny_tokenizer)
    assert "\n" not in str(caught.value)
    assert not out.exists()


def test_preference_settings_are_checked_when_the_config_is_made(tmp_path):
    from lorakit.train.config import TrainConfig

    for bad, message in [(dict(method="ppo"), r"method must be one of \['sft', 'dpo', 'orpo', 'grpo'\], got 'ppo'"),
                         (dict(method="dpo", loss_type="kto"), "loss_type must be one of"),
                         (dict(method="dpo", beta=0), "need beta > 0"),
                         (dict(method="dpo", label_smoothing=0.5), "label_smoothing < 0.5"),
                         (dict(method="orpo", packing=True), "packing: false")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(output_dir=str(tmp_path), **bad)


def test_dpo_from_a_peft_sft_adapter_uses_it_as_reference_on_nf4_with_checkpointing(tmp_path, tiny_tokenizer):
    """--init_adapter DIR written by PEFT: training starts from its weights, the (precomputed) reference is that
    starting adapter (TRL's rule), so step 1 sits at log 2; works on a 4-bit base with gradient checkpointing."""
    import peft

    from lorakit.train import train

    sft = peft.get_peft_model(tiny_llama_for(tiny_tokenizer), peft.LoraConfig(r=4, lora_alpha=8,
                                                                              target_modules=["q_proj", "v_proj"]))
    randomize_adapters(sft, scale=0.2)
    sft.save_pretrained(tmp_path / "sft")
    result = train(tiny_train_config(tmp_path / "dpo", method="dpo", data=DEMO_PAIRS, init_adapter=str(tmp_path / "sft"),
                                     quantize="nf4", gradient_checkpointing=True, max_steps=4, eval_every=4),
                   tiny_llama_for(tiny_tokenizer), tiny_tokenizer)
    history = result["history"]
    assert history[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the start
    assert history[1]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[-1]["eval_rewards/margins"] > 0
    loaded = json.loads((tmp_path / "dpo" / "adapter" / "adapter_config.json").read_text())
    assert loaded["r"] == 4 and sorted(loaded["target_modules"]) == ["q_proj", "v_proj"]  # the starting adapter's


def test_orpo_run_lowers_its_loss_and_logs_its_metrics(tmp_path, tiny_tokenizer):
    from lorakit.train import train

    result = train(tiny_train_config(tmp_path, method="orpo", data=DEMO_PAIRS, max_steps=10, eval_every=10, lr=1e-2),
                   tiny_llama_for(tiny_tokenizer), tiny_tokenizer)
    first, last = result["history"][0], result["history"][-1]
    assert last["eval_loss"] < first["eval_loss"]
    assert {"eval_nll_loss", "eval_log_odds_ratio", "eval_rewards/accuracies"} <= set(last)


def test_label_smoothing_gives_conservative_dpo_in_float64():
    """TRL 1.16 dropped label smoothing from `sigmoid`; lorakit keeps the DPO paper's conservative DPO (cDPO):
    -(1-ε)·log σ(βΔ) - ε·log σ(-βΔ), checked against the formula evaluated in float64, and ε = 0 is plain DPO."""
    from lorakit.train.preference_loss import dpo_losses

    gen = torch.Generator().manual_seed(0)
    logps = [torch.randn(5, generator=gen, dtype=torch.float64) * 30 - 100 for _ in range(4)]
    delta = 0.1 * ((logps[0] - logps[2]) - (logps[1] - logps[3]))
    for eps in (0.0, 0.1, 0.3):
        losses, chosen, rejected = dpo_losses(*logps, beta=0.1, loss_type="sigmoid", label_smoothing=eps)
        expected = [-(1 - eps) * math.log(1 / (1 + math.exp(-d))) - eps * math.log(1 / (1 + math.exp(d)))
                    for d in delta.tolist()]
        assert losses.tolist() == pytest.approx(expected, rel=1e-12)
        assert (chosen - rejected).tolist() == pytest.approx(delta.tolist(), rel=1e-12)


@pytest.mark.parametrize("pairs", [3, 2])
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_fast_paths_give_the_reference_path_loss_and_gradients(tiny_tokenizer, method, pairs):
    """With the training fast paths (fused norms and SwiGLU, padding-free rows, the chunked head) the preference
    loss and every adapter gradient equal the plain padded model's with the full-logits head (fp32 rule). 3 pairs
    are 272 tokens (a multiple of 16), 2 pairs 177: the padding-free row then ends in a 15-token filler."""
    from lorakit.train.fast_paths import enable_fast_paths
    from lorakit.train.loss import TOKEN_MULTIPLE

    examples = [tokenize_pair(*split_prompt(row), tiny_tokenizer) for row in CONVERSATIONAL][:pairs]
    batch = collate_pairs(examples, tiny_tokenizer.pad_token_id)
    assert (int(batch["attention_mask"].sum()) % TOKEN_MULTIPLE == 0) == (pairs == 3)
    results = []
    for fast in (False, True):
        base = tiny_llama_for(tiny_tokenizer)
        if fast:
            assert "padding-free batches" in enable_fast_paths(base)
        model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        randomize_adapters(model, scale=0.2)
        loss = PreferenceLoss(model, method, sft_weight=0.5, fused=fast)(**batch)
        loss.backward()
        results.append((loss, _grads(model)))
    (slow_loss, slow_grads), (fast_loss, fast_grads) = results
    assert_close_fp32(fast_loss, slow_loss)
    for name, grad in slow_grads.items():
        assert_close_fp32(fast_grads[name], grad, name)


def test_memory_check_counts_two_sequences_per_preference_pair(tmp_path):
    from lorakit.train.config import TrainConfig
    from lorakit.train.memory_check import run_shape

    assert run_shape(TrainConfig(output_dir=str(tmp_path), batch_size=4, method="dpo")).batch == 8
    assert run_shape(TrainConfig(output_dir=str(tmp_path), batch_size=4)).batch == 4
