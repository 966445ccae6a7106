"""GRPO on SmolLM2-135M: where a step's time goes (rollout vs update), and rollout speed against transformers'
`generate` on a PEFT model for the same prompts.

    python bench/grpo.py [--steps 4] [--rounds 3] [--json bench/grpo.json]

1. `lorakit train configs/grpo_demo.yaml` for --steps steps (dtype chosen by measurement, as the demo): each step's
   rollout_s (sampling 4 prompts x 8 completions, scoring, reference log-probs) and update_s (forward + backward
   over the 32 completions, optimizer step), from metrics.jsonl.
2. Rollouts alone, interleaved rounds, both in the run's dtype with the demo's LoRA (B randomised so the adapter
   does work): lorakit's rollout path (`train.grpo.sample_completions` on a lorakit model) vs `generate` on a PEFT
   model of the same weights, 32 rows, sampling at T=0.8, exactly 32 new tokens each (min_new_tokens), tokens/s.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from common import copy_lora_weights, machine_name, paired_models, randomize_lora_B

from lorakit.generation import left_padded, pad_token_id
from lorakit.hardware import resolve_bf16
from lorakit.models.loading import load_model, load_tokenizer
from lorakit.train.config import load_train_config
from lorakit.train.grpo import load_prompt_examples, sample_completions
from lorakit.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_split(steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        cfg = load_train_config(os.path.join(ROOT, "configs", "grpo_demo.yaml"),
                                [f"--max_steps={steps}", f"--output_dir={out}", "--progress=false", "--eval_data=null",
                                 "--val_fraction=0.0"])
        history = train(cfg)["history"]
    return [r for r in history if "rollout_s" in r]


def rollout_rates(rounds: int, dtype: torch.dtype, new_tokens: int = 32) -> dict[str, float]:
    tokenizer = load_tokenizer("smollm2-135m")
    base = load_model("smollm2-135m", dtype=dtype)
    ours, theirs = paired_models(base)
    randomize_lora_B(ours, std=0.01)
    copy_lora_weights(ours, theirs)
    ours, theirs = ours.to(dtype).eval(), theirs.to(dtype).eval()
    examples, _ = load_prompt_examples(os.path.join(ROOT, "src/lorakit/data/grpo_arithmetic.jsonl"), tokenizer, 128)
    rows = [e.prompt_ids for e in examples[:4] for _ in range(8)]
    pad = pad_token_id(tokenizer)
    ids, mask = left_padded(rows, pad, "cpu")

    def peft_generate():
        with torch.no_grad():
            theirs.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=1.0, top_k=0,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)

    runs = {"lorakit rollout": lambda: sample_completions(ours, tokenizer, rows, new_tokens, 0.8, 1.0, "cpu",
                                                          min_new_tokens=new_tokens),
            "PEFT + transformers generate": peft_generate}
    seconds = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return {name: len(rows) * new_tokens / sorted(s)[len(s) // 2] for name, s in seconds.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    split = step_split(args.steps)
    dtype = torch.bfloat16 if resolve_bf16("auto", "cpu") else torch.float32
    rates = rollout_rates(args.rounds, dtype)
    print(f"\nGRPO on SmolLM2-135M (configs/grpo_demo.yaml: 4 prompts x 8 completions, <= 32 tokens), "
          f"{str(dtype).split('.')[-1]}; {machine_name('cpu')}")
    print(f"{'step':>5}{'rollout s':>11}{'update s':>10}{'rollout %':>11}{'completion tokens':>19}")
    for r in split:
        total = r["rollout_s"] + r["update_s"]
        print(f"{r['step']:>5}{r['rollout_s']:>11.2f}{r['update_s']:>10.2f}{100 * r['rollout_s'] / total:>10.0f}%"
              f"{r['completions/mean_length'] * 32:>19.0f}")
    print(f"\nrollouts alone, 32 rows x 32 new tokens, T=0.8, median of {args.rounds}")
    print(f"{'setup':<30}{'tokens/s':>10}")
    for name, rate in rates.items():
        print(f"{name:<30}{rate:>10.1f}")
    ratio = rates["lorakit rollout"] / rates["PEFT + transformers generate"]
    print(f"lorakit / PEFT: {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_name("cpu"), "dtype": str(dtype), "steps": split, "rollout_tokens_per_s": rates,
                       "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
