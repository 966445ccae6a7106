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

if "--lorakit" in sys.argv:
    import lorakit

    lorakit.install_as_peft()

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
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                      task_type="CAUSAL_LM", **kw)


def base(tok):
    return tiny_llama_for(tok, seed=1, initializer_range=0.2, tie_word_embeddings=True)


def losses(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h]


def probe_logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROBE)).logits[0, :, :16].double().tolist()


def finish(trainer, out, key="loss"):
    trainer.save_model(out)
    return {"losses": losses(trainer, key), "dir": out, "logits": probe_logits(trainer.model),
            "files": sorted(os.listdir(out)), "history": trainer.state.log_history, "model_class": type(trainer.model).__module__.split(".")[0]}


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
    from peft import get_peft_model
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=out, max_steps=4, max_length=64, **COMMON)
    trainer = SFTTrainer(model=get_peft_model(base(tok), lora_config()), args=args,
                         train_dataset=Dataset.from_list(chat_rows()), processing_class=tok)
    trainer.train()
    return finish(trainer, out)


def preference_rows():
    return [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": f"It is {2 * i}."}],
             "rejected": [{"role": "assistant", "content": f"It is {2 * i + 3}."}]} for i, q in enumerate(QUESTIONS)]


def dpo_no_ref_model(tok, out):
    from peft import get_peft_model
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=out, max_steps=4, max_length=64, beta=0.1, **COMMON)
    trainer = DPOTrainer(model=get_peft_model(base(tok), lora_config()), ref_model=None, args=args,
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


SCENARIOS = {f.__name__: f for f in (sft_peft_config, sft_wrapped_model, dpo_no_ref_model, kto_peft_config,
                                      grpo_peft_config)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?")
    parser.add_argument("--lorakit", action="store_true")
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
    from peft import PeftModel

    tok = make_tiny_tokenizer()
    with open(path) as f:
        results = json.load(f)
    loaded = {name: probe_logits(PeftModel.from_pretrained(base(tok), r["dir"])) for name, r in results.items()}
    print(json.dumps(loaded))


if __name__ == "__main__":
    main()
