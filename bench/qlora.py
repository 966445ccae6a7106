"""QLoRA vs LoRA vs PEFT on SmolLM2-135M: loss curves and peak memory, one run.

    python bench/qlora.py [--steps 30] [--json bench/qlora.json]

Same data, schedule and LoRA config as bench/train_vs_peft.py. Three subprocesses:
PEFT + transformers fp32 (the reference), lorakit bf16 (default path), and lorakit QLoRA
(NF4 double-quantized base, gradient checkpointing, as the QLoRA paper trains).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_vs_peft import BATCH, LORA, LR, MAX_LEN, WARMUP, worker, write_bench_data  # noqa: E402


def qlora_worker(steps: int, seed: int, data_path: str) -> dict:
    from lorakit.train.config import TrainConfig
    from lorakit.train import train

    losses, times, last = [], [], [time.perf_counter()]

    def on_step(step, record):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        losses.append(record["train_loss"])
        print(f"  qlora step {step}/{steps} loss {losses[-1]:.4f} ({times[-1]:.1f} s)", file=sys.stderr)

    train(TrainConfig(data=data_path, prompts=None, output_dir=tempfile.mkdtemp(), max_length=MAX_LEN,
                      batch_size=BATCH, max_steps=steps, lr=LR, warmup_steps=WARMUP, val_fraction=0.0,
                      eval_every=10**6, save_every=10**6, seed=seed, progress=False, quantize="nf4",
                      gradient_checkpointing=True, lora=dict(**LORA, lora_dropout=0.0)), on_step=on_step)
    return {"kind": "qlora", "losses": losses, "seconds_per_step": sum(times[1:]) / max(1, len(times) - 1),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "qlora.json"))
    ap.add_argument("--worker", choices=["peft", "lorakit", "qlora"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "qlora":
        print(json.dumps(qlora_worker(args.steps, args.seed, args.data)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.seed, 0.0, args.data)))
        return
    data_path = os.path.join(tempfile.mkdtemp(), "bench.jsonl")
    write_bench_data(data_path)
    results = {}
    for kind in ("peft", "lorakit", "qlora"):
        out = subprocess.run([sys.executable, __file__, "--worker", kind, f"--steps={args.steps}",
                              f"--seed={args.seed}", f"--data={data_path}"], check=True, stdout=subprocess.PIPE,
                             text=True)
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    final = {k: sum(r["losses"][-5:]) / 5 for k, r in results.items()}
    peft_rss = results["peft"]["peak_rss_gb"]
    print(f"\n{args.steps} steps, batch {BATCH}, LoRA r=16 on q,k,v,o,gate,up,down, lr {LR}")
    print(f"{'':<22}{'peak RSS GB':>12}{'vs PEFT':>9}{'final loss':>12}{'vs bf16 LoRA':>14}")
    names = {"peft": "PEFT fp32", "lorakit": "lorakit bf16 LoRA", "qlora": "lorakit QLoRA (NF4)"}
    for kind, r in results.items():
        print(f"{names[kind]:<22}{r['peak_rss_gb']:>12.2f}{r['peak_rss_gb'] / peft_rss:>8.2f}x{final[kind]:>12.4f}"
              f"{100 * (final[kind] - final['lorakit']) / final['lorakit']:>13.1f}%")
    table = {"steps": args.steps, "final_loss": final, "peak_rss_gb": {k: r["peak_rss_gb"] for k, r in results.items()},
             "qlora_rss_vs_peft": results["qlora"]["peak_rss_gb"] / peft_rss,
             "loss_curves": {k: r["losses"] for k, r in results.items()}}
    with open(args.json, "w") as f:
        json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
