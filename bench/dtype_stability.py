"""Is the measured default dtype stable and as fast as the faster forced dtype? Five back-to-back rounds.

    python bench/dtype_stability.py [--rounds 5] [--steps 12] [--workload arithmetic|short|long]

Each round runs `lorakit train` three times, one process each, the same rows and settings: `--bf16=true`,
`--bf16=false`, and the default (`bf16: auto`, the dtype chosen by measurement). The rounds share one calibration
cache that starts empty (a temporary XDG_CACHE_HOME), so round 1's default run measures and the later ones read what
it kept, as on a user's machine. tokens/s is each run's steady state from its metrics.jsonl (the mean of the
fastest quarter of steps 3..; steps 1-2 warm up), the three runs' order rotating from round to round. A fourth run
per round repeats the faster forced dtype: how far two identical runs differ on this machine (the noise floor of
the comparison); the default's chosen dtype, the rates it measured and the seconds its decision took come from the first line
of the same file. A round passes where the default reaches >= 0.95 of the faster forced run of that round.

Prints one row per round and writes bench/dtype_stability.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import yaml

from train_vs_peft import BATCH, LR, MAX_LEN, WARMUP, write_bench_data
from common import LORA

from lorakit.hardware import cpu_model
from lorakit.utils import cache_root

THRESHOLD = 0.95
SETTINGS = {"bf16": "--bf16=true", "fp32": "--bf16=false", "default": None}


def steady_tokens_per_s(records: list[dict]) -> float:
    """tokens/s of a run's steady state: the mean of the fastest quarter of steps 3.. (each step's tokens and seconds
    from the cumulative tokens_per_s x elapsed_s). Not the mean or the median: on a shared 2-core machine a
    neighbour slows a stretch of one run by 10-30 % (measured: identical runs at 0.88 and 1.02 s a step), which says
    nothing about the dtype; the fastest steps of each run are its machine's best."""
    steps = [r for r in records if "train_loss" in r]
    tokens = [r["tokens_per_s"] * r["elapsed_s"] for r in steps]
    rates = sorted(((tokens[i] - tokens[i - 1]) / (steps[i]["elapsed_s"] - steps[i - 1]["elapsed_s"])
                    for i in range(2, len(steps))), reverse=True)
    return statistics.mean(rates[:max(1, len(rates) // 4)])


def run_once(config: str, out: str, setting: str | None, env: dict) -> dict:
    subprocess.run([sys.executable, "-m", "lorakit", "train", config, "--quiet", f"--output_dir={out}",
                    *([setting] if setting else [])], check=True, env=env, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    settings = records[0]["settings"]
    return {"tokens_per_s": steady_tokens_per_s(records), "compute_dtype": settings["compute_dtype"],
            "decision": settings.get("dtype_decision")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workload", choices=["arithmetic", "short", "long"], default="arithmetic")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "dtype_stability.json"))
    args = ap.parse_args()
    if args.steps < 4:
        ap.error(f"--steps must be >= 4 (steps 1-2 warm up), got {args.steps}")
    work = tempfile.mkdtemp()
    data = os.path.join(work, "rows.jsonl")
    write_bench_data(data, args.workload)
    config = os.path.join(work, "config.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"data": data, "prompts": None, "max_length": MAX_LEN, "batch_size": BATCH,
                        "max_steps": args.steps, "lr": LR, "warmup_steps": WARMUP, "val_fraction": 0.0,
                        "save_every": 10**6, "lora": dict(LORA, lora_dropout=0.0)}, f)
    env = dict(os.environ, XDG_CACHE_HOME=os.path.join(work, "cache"), CUDA_VISIBLE_DEVICES="")
    model_cache, run_cache = cache_root(), os.path.join(env["XDG_CACHE_HOME"], "lorakit")
    os.makedirs(run_cache)
    if os.path.isdir(model_cache):  # the converted model is reused; only the calibration starts empty
        for name in os.listdir(model_cache):
            if name != "calibration.json":
                os.symlink(os.path.join(model_cache, name), os.path.join(run_cache, name))
    rounds = []
    print(f"{cpu_model()}; {args.steps} steps of {BATCH} rows ({args.workload}); tokens/s over steps 3..")
    print(f"{'round':>5}{'bf16':>9}{'fp32':>9}{'default':>9}{'chose':>7}{'of faster':>11}{'faster again':>15}"
          f"{'probe s':>9}"
          f"{'measured fp32 / bf16 GFLOP/s':>30}")
    for i in range(args.rounds):
        names = list(SETTINGS)[i % 3:] + list(SETTINGS)[:i % 3]  # round 1: bf16 first; round 2: fp32 first; ...
        runs = {name: run_once(config, os.path.join(work, f"r{i}-{name}"), SETTINGS[name], env) for name in names}
        faster_name = "bf16" if runs["bf16"]["tokens_per_s"] >= runs["fp32"]["tokens_per_s"] else "fp32"
        faster = runs[faster_name]["tokens_per_s"]
        again = run_once(config, os.path.join(work, f"r{i}-again"), SETTINGS[faster_name], env)["tokens_per_s"]
        decision = runs["default"]["decision"]
        row = {name: r["tokens_per_s"] for name, r in runs.items()}
        row.update(chose=runs["default"]["compute_dtype"], of_faster=row["default"] / faster, faster=faster_name,
                   again=again, again_of_faster=again / faster, probe_s=decision["probe_s"],
                   measured=decision["gflops"])
        rounds.append(row)
        print(f"{i + 1:>5}{row['bf16']:>9.0f}{row['fp32']:>9.0f}{row['default']:>9.0f}{row['chose']:>7}"
              f"{row['of_faster']:>11.3f}{row['again_of_faster']:>15.3f}{row['probe_s']:>9.2f}"
              f"{row['measured']['fp32']:>17g} / {row['measured']['bf16']:g}")
    passed = sum(r["of_faster"] >= THRESHOLD for r in rounds)
    same = len({r["chose"] for r in rounds}) == 1
    control = sum(r["again_of_faster"] >= THRESHOLD for r in rounds)
    print(f"default >= {THRESHOLD} of the faster forced dtype in {passed} of {len(rounds)} rounds; "
          f"{'the same choice' if same else 'DIFFERENT choices'} in every round; the faster forced dtype run again: "
          f">= {THRESHOLD} of itself in {control} of {len(rounds)}")
    from lorakit.utils import atomic_path

    with atomic_path(args.json) as tmp, open(tmp, "w") as f:
        json.dump({"cpu": cpu_model(), "workload": args.workload, "steps": args.steps, "batch": BATCH,
                   "threshold": THRESHOLD, "rounds": rounds, "passed": passed, "same_choice": same,
                   "control_passed": control}, f, indent=2)
    return 0 if passed == len(rounds) and same else 1


if __name__ == "__main__":
    sys.exit(main())
