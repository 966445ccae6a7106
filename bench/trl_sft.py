"""TRL's SFTTrainer on the embedded SmolLM2-135M-Instruct: real PEFT vs lorakit (`install_as_peft()`), same run.

    python bench/trl_sft.py [--steps 20] [--modes bf16,fp32,bf16-weights] [--json bench/trl_sft.json]

The same script body (`SFTTrainer(model=base, peft_config=LoraConfig(...))`, TRL's defaults otherwise: gradient
checkpointing on, the loss on the completion only) runs in a fresh process per library and per mode, so each
peak RSS is its own, alternating PEFT / lorakit. Modes (PEFT at its best is the fastest of them on this CPU):
  bf16          fp32 weights, TRL's default `bf16=True` (autocast)
  fp32          fp32 weights, `bf16=False`
  bf16-weights  the base loaded in bf16 (`dtype=torch.bfloat16`), adapters fp32, `bf16=True`
LoRA r=16, alpha 32 on q,k,v,o,gate,up,down; batch 8 demo rows (single chat turns, ~100 tokens), lr 2e-4.
tokens/s counts the tokens TRL reports (`num_tokens`) over steps 3.. (steps 1-2 warm up); peak RSS is the
process's maximum resident set. Also printed: the first losses, which must agree between the libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

MODES = ("bf16", "fp32", "bf16-weights")
LIBRARIES = ("peft", "lorakit")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def worker(library: str, mode: str, steps: int) -> dict:
    if library == "lorakit":
        import lorakit

        lorakit.install_as_peft()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lorakit.models.loading import resolve_model_dir
    from lorakit.train import data as D
    from lorakit.train.config import DEMO_DATA

    directory = resolve_model_dir("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    base = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.bfloat16 if mode == "bf16-weights" else torch.float32)
    rows = Dataset.from_list([r for _, r in D.read_rows(DEMO_DATA)])
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append((time.perf_counter(), state.num_input_tokens_seen))

    args = SFTConfig(output_dir=os.path.join("/tmp", f"trl_sft_{library}_{mode}"), max_steps=steps,
                     per_device_train_batch_size=8, learning_rate=2e-4, logging_steps=1, save_strategy="no",
                     report_to=[], use_cpu=True, seed=0, bf16=mode != "fp32", disable_tqdm=True,
                     include_num_input_tokens_seen=True)
    trainer = SFTTrainer(model=base, args=args, train_dataset=rows, processing_class=tokenizer, callbacks=[Clock()],
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                task_type="CAUSAL_LM"))
    trainer.train()
    (t0, n0), (t1, n1) = stamps[1], stamps[-1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"library": library, "mode": mode, "tokens_per_s": (n1 - n0) / (t1 - t0),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "losses": losses,
            "model_class": type(trainer.model).__module__.split(".")[0], "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "trl_sft.json"))
    ap.add_argument("--worker", nargs=2, metavar=("LIBRARY", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if args.steps < 4:
        ap.error(f"--steps must be >= 4 (steps 1-2 warm up), got {args.steps}")
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps)))
        return
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results = []
    for mode in modes:
        for library in LIBRARIES:
            print(f"running {library} {mode} ({args.steps} steps) ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--worker", library, mode, f"--steps={args.steps}"],
                                 check=True, stdout=subprocess.PIPE, text=True, env=env)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    from common import machine_name

    by = {(r["library"], r["mode"]): r for r in results}
    print(f"\nTRL {__import__('trl').__version__} SFTTrainer, SmolLM2-135M-Instruct, {args.steps} steps of 8 rows; "
          f"{machine_name()}")
    print(f"{'mode':<13} {'PEFT tok/s':>10} {'lorakit tok/s':>13} {'ratio':>6} {'PEFT RSS GB':>11} "
          f"{'lorakit RSS GB':>14} {'ratio':>6}  first losses PEFT / lorakit")
    for mode in modes:
        p, k = by[("peft", mode)], by[("lorakit", mode)]
        print(f"{mode:<13} {p['tokens_per_s']:>10.0f} {k['tokens_per_s']:>13.0f} "
              f"{k['tokens_per_s'] / p['tokens_per_s']:>6.2f} {p['peak_rss_gb']:>11.2f} {k['peak_rss_gb']:>14.2f} "
              f"{k['peak_rss_gb'] / p['peak_rss_gb']:>6.2f}  {p['losses'][:2]} / {k['losses'][:2]}")
    best = {lib: max((by[(lib, m)] for m in modes), key=lambda r: r["tokens_per_s"]) for lib in LIBRARIES}
    print(f"fastest: PEFT {best['peft']['mode']} {best['peft']['tokens_per_s']:.0f} tok/s, lorakit "
          f"{best['lorakit']['mode']} {best['lorakit']['tokens_per_s']:.0f} tok/s: "
          f"{best['lorakit']['tokens_per_s'] / best['peft']['tokens_per_s']:.2f}x")
    with open(args.json, "w") as f:
        json.dump({"machine": machine_name(), "steps": args.steps, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
