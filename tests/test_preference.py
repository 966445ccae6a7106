"""Preference training (DPO, IPO, ORPO): losses, rewards and gradients against TRL's trainers on the same model,
adapter weights and batch; the disabled-adapter reference; the data files; runs end to end."""

import json
import warnings

import pytest
import torch
from conftest import assert_close_fp32, copy_adapters_to_peft, randomize_adapters, tiny_llama_for

import lorakit
from lorakit.train.preference_data import PreferenceExample, collate_pairs, load_preference_examples
from lorakit.train.preference_loss import PreferenceLoss

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


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("fused", [True, False])
def test_dpo_loss_rewards_and_gradients_equal_trl(tmp_path, tiny_tokenizer, loss_type, fused):
    trainer = _trl("dpo", tiny_tokenizer, tmp_path, CONVERSATIONAL, beta=0.1, loss_type=[loss_type])
    examples, _ = load_preference_examples(_write(tmp_path / "pairs.jsonl", CONVERSATIONAL), tiny_tokenizer, 256)
    for ours, theirs in zip(examples, trainer.train_dataset, strict=True):  # TRL's tokenization, token for token
        assert (ours.prompt_ids, ours.chosen_ids, ours.rejected_ids) == \
            (theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"])
    ours = _ours(tiny_tokenizer, trainer)
    batch = collate_pairs(examples, tiny_tokenizer.pad_token_id)
    trl_loss = trainer._compute_loss(trainer.model, {k: v for k, v in batch.items()}, False)
    trl_loss.backward()
    module = PreferenceLoss(ours, "dpo", beta=0.1, loss_type=loss_type, fused=fused)
    loss = module(**batch) / 3
    loss.backward()
    metrics = {name: value / 3 for name, value in module.take_metrics().items()}
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
