"""The demo task with every LoRA variant: trainable parameters, tokens/s, final train / held-out loss.

Each variant runs the library's own `train()` on the embedded SmolLM2-135M-Instruct with the demo
data and settings (7 targets, batch 8, bf16 base where the CPU has fast bf16), for the same number
of steps. Writes bench/variants.json and bench/variants.png (loss curves) and prints a table.

    python bench/variants.py --steps 30
"""

import argparse
import json
import os
import tempfile
import time

from common import machine_name

from lorakit.train.config import DEMO_LORA, TrainConfig
from lorakit.train import train
from lorakit.train.plot import plot_curves

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (lora settings on top of the demo's, extra TrainConfig settings)
VARIANTS = {
    "LoRA": ({}, {}),
    "rsLoRA": ({"use_rslora": True, "lora_alpha": 8}, {}),    # alpha/sqrt(r) = 2, the same scale as LoRA's 32/16
    "DoRA": ({"use_dora": True}, {}),
    "VeRA": ({"peft_type": "VERA", "r": 256}, {"lr": 1e-2}),  # VeRA trains vectors only: needs ~10x the lr
    # AdaLoRA starts at E = 0 with A, B ~ N(0, 0.02): ΔW grows slowly, so it needs VeRA's lr in a short run
    "AdaLoRA": ({"peft_type": "ADALORA", "init_r": 24, "target_r": 16, "lora_alpha": 32}, {"lr": 1e-2}),
    "LoRA+": ({}, {"loraplus_lr_ratio": 16, "lr": 2.5e-4}),   # B at 16x A's lr (paper's setting)
    "PiSSA": ({"init_lora_weights": "pissa_niter_4"}, {"lr": 2e-4}),  # principal directions: smaller steps
}


def run(name, steps, out_root):
    lora_extra, cfg_extra = VARIANTS[name]
    lora = dict(DEMO_LORA) | lora_extra
    if name == "AdaLoRA":
        lora |= {"tinit": steps // 5, "tfinal": steps // 5, "total_step": steps}
    cfg = TrainConfig(max_steps=steps, prompts=None, progress=False, eval_every=max(1, steps // 5),
                      save_every=10 ** 6, output_dir=os.path.join(out_root, name), lora=lora, **cfg_extra)
    started = time.perf_counter()
    result = train(cfg)
    model = result["model"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    history = result["history"]
    evals = [r for r in history if "eval_loss" in r]
    trains = [r for r in history if "train_loss" in r]
    return {"variant": name, "trainable_params": trainable, "tokens_per_s": trains[-1]["tokens_per_s"],
            "final_train_loss": sum(r["train_loss"] for r in trains[-5:]) / len(trains[-5:]),
            "held_out_before": evals[0]["eval_loss"], "held_out_after": evals[-1]["eval_loss"],
            "lr": cfg.lr, "lora": {k: v for k, v in lora.items() if k != "target_modules"},
            "seconds": time.perf_counter() - started, "history": history}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--out", default=os.path.join(HERE, "variants.json"))
    parser.add_argument("--update", action="store_true", help="replace only the rows run now in an existing --out")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory() as out_root:
        for name in names:
            rows.append(run(name, args.steps, out_root))
            print(f"{name}: done in {rows[-1]['seconds']:.0f} s", flush=True)
    if args.update and os.path.exists(args.out):
        with open(args.out) as f:
            new = {r["variant"]: r for r in rows}
            rows = [new.pop(r["variant"], r) for r in json.load(f)["rows"]] + list(new.values())
    header = "| variant | trainable params | tokens/s | train loss (last 5) | held-out loss before -> after |"
    lines = [header, "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['trainable_params']:,} | {r['tokens_per_s']:.0f} | "
                     f"{r['final_train_loss']:.3f} | {r['held_out_before']:.3f} -> {r['held_out_after']:.3f} |")
    table = "\n".join(lines)
    print(table)
    machine = machine_name()
    with open(args.out, "w") as f:
        json.dump({"steps": args.steps, "machine": machine, "rows": rows, "table": table}, f, indent=1)
    plot_curves({r["variant"]: r["history"] for r in rows}, os.path.splitext(args.out)[0] + ".png",
                title=f"SmolLM2-135M demo task, {args.steps} steps")


if __name__ == "__main__":
    main()
