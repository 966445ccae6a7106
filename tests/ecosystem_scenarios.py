"""TRL and transformers scripts as a PEFT user writes them (`from peft import ...`), run in a fresh process on the
real peft or, with `--lorakit`, on lorakit through `lorakit.install_as_peft()`: the same body either way.

    python tests/ecosystem_scenarios.py OUT_DIR [--lorakit] [--only NAME ...]

Writes OUT_DIR/results.json: per scenario the logged per-step losses, the saved directory and the trained
model's logits on fixed probe ids (for tests/test_ecosystem.py, which loads each saved directory in real PEFT).
`python tests/ecosystem_scenarios.py --load-check RESULTS.json` (real peft) prints the logits each saved
directory gives when loaded with `PeftModel.from_pretrained`.
"""

import argparse
import json
import os
import sys

if "--lorakit" in sys.argv:  # the switch: `import peft` below is lorakit
    import lorakit

    lorakit.install_as_peft()
if "--lorakit-direct" in sys.argv:  # no switch: lorakit's own names where the script says peft (Trainer only)
    import lorakit as peft
else:
    import peft

    if peft.__version__ == "0.21.2":  # transformers 5.25's adapter API asks for >= 0.22 (not on the registry);
        import transformers.integrations.peft as hf_peft  # the reference runs 0.21.2 through the same code

        hf_peft.check_peft_version = lambda min_version: None

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from conftest import make_tiny_tokenizer, tiny_llama_for  # noqa: E402

torch.set_num_threads(1)
PROBE = [[5, 17, 33, 80, 121, 7, 250, 19]]
QUESTIONS = [f"What is {i} plus {i}?" for i in range(16)]
COMMON = dict(report_to=[], use_cpu=True, logging_steps=1, seed=0, per_device_train_batch_size=4,
              learning_rate=1e-2, save_strategy="no", disable_tqdm=True)


def lora_config(**kw):
    kw = {"target_modules": ["q_proj", "v_proj", "down_proj"], **kw}
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", **kw)


def base(tok):
    return tiny_llama_for(tok, seed=1, initializer_range=0.2, tie_word_embeddings=True)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def probe_logits(model):
    """Logits on PROBE in float32: the trainer's autocast wrapper (bf16=True) is taken off the forward first, so
    the trained model and the reloaded directory are evaluated alike."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROBE)).logits[0, :, :16].double().tolist()


def finish(trainer, out):
    trainer.save_model(out)
    return {"losses": losses(trainer), "dirs": {"saved": out}, "logits": probe_logits(trainer.model),
            "files": sorted(os.listdir(out)), "model_class": type(trainer.model).__module__.split(".")[0]}


def chat_rows():
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"It is {2 * i}."}]}
            for i, q in enumerate(QUESTIONS)]


def sft_peft_config(tok, out):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=out, max_steps=4, max_length=64, **COMMON)
    trainer = SFTTrainer(model=base(tok), args=args, train_dataset=Dataset.from_list(chat_rows()),
                         processing_class=tok, peft_config=lora_config())
    trainer.train()
    return finish(trainer, out)


def sft_wrapped_model(tok, out):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=out, max_steps=4, max_length=64, **COMMON)
    trainer = SFTTrainer(model=peft.get_peft_model(base(tok), lora_config()), args=args,
                         train_dataset=Dataset.from_list(chat_rows()), processing_class=tok)
    trainer.train()
    return finish(trainer, out)


def sft_fp32(tok, out):
    """bf16=False: lorakit's fused LoRA kernel trains inside TRL's loop."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=out, max_steps=4, max_length=64, bf16=False, **COMMON)
    trainer = SFTTrainer(model=base(tok), args=args, train_dataset=Dataset.from_list(chat_rows()),
                         processing_class=tok, peft_config=lora_config())
    trainer.train()
    return finish(trainer, out)


def trainer_save_resume_best(tok, out):
    """Plain transformers Trainer: checkpoints every 2 steps, a run resumed from checkpoint-2, and
    load_best_model_at_end with the *highest* eval loss as best (so the reloaded checkpoint is not the last)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    rows = [{"input_ids": tok(f"row {i} says {i * 7 % 13} to the trainer")["input_ids"]} for i in range(24)]
    collator = DataCollatorForLanguageModeling(tok, mlm=False)

    def run(folder, resume=None):
        args = TrainingArguments(output_dir=os.path.join(out, folder), max_steps=6, eval_strategy="steps",
                                 eval_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                                 greater_is_better=True, **{**COMMON, "save_strategy": "steps", "save_steps": 2})
        trainer = Trainer(model=peft.get_peft_model(base(tok), lora_config()), args=args, train_dataset=rows,
                          eval_dataset=rows[:8], data_collator=collator)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    resumed = run("resumed", resume=os.path.join(out, "full", "checkpoint-2"))
    result = finish(full, os.path.join(out, "saved"))
    result.update(best=os.path.relpath(full.state.best_model_checkpoint, out), resumed_losses=losses(resumed),
                  checkpoint_files=sorted(os.listdir(os.path.join(out, "full", "checkpoint-2"))))
    result["dirs"].update({f"{run}/checkpoint-{step}": os.path.join(out, run, f"checkpoint-{step}")
                           for run in ("full", "resumed") for step in (2, 6)})
    return result


def fill_lora(model, scale=0.1):
    """Every lora_* parameter set from a generator seeded by its name: the same adapter on either library."""
    import zlib

    for name, param in model.named_parameters():
        if "lora_" in name:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            param.data = torch.randn(param.shape, generator=g, dtype=param.dtype) * scale


def transformers_adapter_api(tok, out):
    """transformers' own adapter API (integrations/peft.py) on an adapter with known weights: load_adapter,
    enable/disable_adapters, add_adapter + set_adapter, and AutoModelForCausalLM.from_pretrained(adapter_dir)."""
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir = os.path.join(out, "base"), os.path.join(out, "adapter")
    base(tok).save_pretrained(base_dir)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora_config())
    fill_lora(model)
    model.save_pretrained(adapter_dir)
    cells = {}
    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    fresh.load_adapter(adapter_dir, adapter_name="loaded")
    cells["load_adapter"] = probe_logits(fresh)
    fresh.disable_adapters()
    cells["disable_adapters"] = probe_logits(fresh)
    fresh.enable_adapters()
    cells["enable_adapters"] = probe_logits(fresh)
    fresh.add_adapter(lora_config(target_modules=["k_proj", "up_proj"]), adapter_name="added")
    fill_lora(fresh, scale=0.05)
    fresh.set_adapter("added")
    cells["add_adapter+set_adapter"] = probe_logits(fresh)
    cells["active_adapters"] = fresh.active_adapters()
    cells["adapter_state_keys"] = sorted(fresh.get_adapter_state_dict("added"))
    cells["from_pretrained(adapter_dir)"] = probe_logits(AutoModelForCausalLM.from_pretrained(adapter_dir))
    cells["base"] = probe_logits(AutoModelForCausalLM.from_pretrained(base_dir))
    return {"cells": cells, "dirs": {"saved": adapter_dir}, "logits": cells["load_adapter"], "losses": []}


def preference_rows():
    return [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": f"It is {2 * i}."}],
             "rejected": [{"role": "assistant", "content": f"It is {2 * i + 3}."}]} for i, q in enumerate(QUESTIONS)]


def dpo_no_ref_model(tok, out):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=out, max_steps=4, max_length=64, beta=0.1, **COMMON)
    trainer = DPOTrainer(model=peft.get_peft_model(base(tok), lora_config()), ref_model=None, args=args,
                         train_dataset=Dataset.from_list(preference_rows()), processing_class=tok)
    trainer.train()
    return finish(trainer, out)


def kto_peft_config(tok, out):
    from trl.experimental.kto import KTOConfig, KTOTrainer

    rows = [{"prompt": [{"role": "user", "content": q}],
             "completion": [{"role": "assistant", "content": f"It is {2 * i + (i % 2) * 3}."}], "label": i % 2 == 0}
            for i, q in enumerate(QUESTIONS)]
    args = KTOConfig(output_dir=out, max_steps=4, max_length=64, beta=0.1, **COMMON)
    trainer = KTOTrainer(model=base(tok), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora_config())
    trainer.train()
    return finish(trainer, out)


def digit_reward(completions, **_):
    """Reward: the share of digits in the completion (varies between sampled completions)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) + 0.01 * len(t) for t in texts]


def grpo_peft_config(tok, out):
    from trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS[:8]]
    args = GRPOConfig(output_dir=out, max_steps=3, num_generations=4, max_completion_length=8, beta=0.04,
                      generation_batch_size=8, **COMMON)
    trainer = GRPOTrainer(model=base(tok), reward_funcs=digit_reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, peft_config=lora_config())
    trainer.train()
    return finish(trainer, out)


SCENARIOS = {f.__name__: f for f in (sft_peft_config, sft_wrapped_model, sft_fp32, dpo_no_ref_model,
                                      kto_peft_config, grpo_peft_config, trainer_save_resume_best,
                                      transformers_adapter_api)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?")
    parser.add_argument("--lorakit", action="store_true")
    parser.add_argument("--lorakit-direct", action="store_true")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--load-check")
    args = parser.parse_args()
    if args.load_check:
        return load_check(args.load_check)
    tok = make_tiny_tokenizer()
    results = {}
    for name in args.only or SCENARIOS:
        results[name] = SCENARIOS[name](tok, os.path.join(args.out, name))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f)


def load_check(path):
    tok = make_tiny_tokenizer()
    with open(path) as f:
        results = json.load(f)
    loaded = {name: {label: probe_logits(peft.PeftModel.from_pretrained(base(tok), folder))
                     for label, folder in r["dirs"].items() if os.path.isdir(folder)}
              for name, r in results.items()}
    print(json.dumps(loaded))


if __name__ == "__main__":
    main()
