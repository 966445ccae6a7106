"""Forward latency on SmolLM2-135M: base vs merged vs unmerged adapters, lorakit and PEFT, one run.

    python bench/forward.py [--batch 4] [--seq 128] [--rounds 7] [--json out.json]

Each configuration is timed in interleaved rounds (so drift in machine speed hits all of them
alike); the table shows the median per forward pass and the ratio to the base model.
"""

import argparse
import copy
import json
import statistics
import time

import torch
from common import machine_name, paired_models

from lorakit.models.loading import load_model


def _timed(fn, x, reps):
    with torch.inference_mode():
        fn(x)  # warm-up
        start = time.perf_counter()
        for _ in range(reps):
            fn(x)
    return (time.perf_counter() - start) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    base = load_model("smollm2-135m")
    ours, theirs = paired_models(base)
    ours_merged = copy.deepcopy(ours)
    ours_merged.merge_adapter()
    theirs_merged = copy.deepcopy(theirs)
    theirs_merged.merge_adapter()
    x = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
    runs = {
        "base model": base,
        "lorakit merged": ours_merged,
        "PEFT merged": theirs_merged,
        "lorakit unmerged": ours,
        "PEFT unmerged": theirs,
    }
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, model in runs.items():
            times[name].append(_timed(lambda ids: model(input_ids=ids).logits, x, args.reps))
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = [(name, med[name] * 1e3, med[name] / med["base model"]) for name in runs]
    print(f"\nforward, batch {args.batch} x {args.seq} tokens; {machine_name()}")
    print(f"{'setup':<20}{'ms / forward':>14}{'vs base':>10}")
    for name, ms, ratio in rows:
        print(f"{name:<20}{ms:>14.1f}{ratio:>10.2f}")
    print(f"lorakit unmerged / PEFT unmerged: {med['lorakit unmerged'] / med['PEFT unmerged']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "seq": args.seq, "ms": {k: v * 1e3 for k, v in med.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
