"""LoRA training speed, memory and quality: lorakit's default path vs PEFT + transformers in fp32 and in bf16, same run.

    python bench/train_vs_peft.py [--steps 50] [--workload long|short|arithmetic] [--seeds 1] [--json ...]
                                  [--device cpu|cuda]

SmolLM2-135M-Instruct, LoRA r=16 (alpha 32, dropout --dropout) on q,k,v,o,gate,up,down, AdamW
(lr 2e-4, warmup 5 + cosine), batch 8 rows of ~256 tokens (3-turn conversations built from the
bundled demo data; `--workload short`: the demo rows themselves, single chat turns of ~100 tokens, the
shape of most fine-tuning data, where per-step fixed costs weigh most; `--workload arithmetic`: "What is 17 + 25?
Answer with the number only." -> "42", rows of ~50 tokens, scored after training by greedy exact answers on 200
held-out sums), loss on assistant tokens. All runs see the same rows in the same order for the same number of
optimizer steps; each runs in its own subprocess so peak RSS is its own. `--seeds N` repeats every run with seeds
0..N-1 (adapter initialisation and batch order) and reports the mean held-out accuracy and the median speed.

PEFT runs as its users run it at their best on that machine: an fp32 model, and a bf16 model (adapters kept in fp32
by PEFT) wherever the CPU multiplies bf16 natively (measured bf16 rate >= half the fp32 rate; an emulating CPU would
only time the emulation).
tokens/s counts real (non-padding) tokens and excludes the first (warm-up) step and the second, whose
operators are counted (kernels/step: aten calls below autograd, and how many of them are matmuls).

--device cuda runs all workers on the GPU, adds PEFT on a bf16 base (what GPU users of PEFT
run) as a second peer, and compares peak GPU memory (torch.cuda.max_memory_allocated) instead
of peak RSS. On the CPU the workers see no GPU (CUDA_VISIBLE_DEVICES=""), and lorakit runs its
default CPU path.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from common import LORA, machine_name, matmul_peak_gflops  # noqa: E402  (lora_dropout comes from --dropout; PEFT default 0)
from gemm_ceiling import GemmRecorder, gemm_seconds  # noqa: E402
from lorakit.hardware import cpu_model  # noqa: E402

LR, WARMUP, BATCH, MAX_LEN, TURNS = 2e-4, 5, 8, 320, 3
ARITHMETIC_TRAIN, ARITHMETIC_HELD_OUT = slice(0, 600), slice(650, 850)  # disjoint (a, op, b) triples
ANSWER_ONLY = "Answer with the number only."


def arithmetic_items(part: slice) -> list[tuple[str, str]]:
    """(question, answer) pairs of the bundled GRPO arithmetic generator, asked for the bare number."""
    import importlib.util

    import lorakit

    path = os.path.join(os.path.dirname(lorakit.__file__), "data", "make_grpo_data.py")
    spec = importlib.util.spec_from_file_location("make_grpo_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [(row["prompt"][0]["content"].split("?")[0] + "? " + ANSWER_ONLY, row["answer"])
            for row in module.rows()[part]]


def held_out_accuracy(model, tokenizer) -> float:
    """Share of the held-out sums answered exactly (greedy, the same evaluator for every run)."""
    from lorakit.generation import answer_prompts

    items = arithmetic_items(ARITHMETIC_HELD_OUT)
    answers = answer_prompts(model, tokenizer, [q for q, _ in items], max_new_tokens=8, batch_size=50)
    return sum(a.strip().rstrip(".") == expected for a, (_, expected) in zip(answers, items)) / len(items)


def write_bench_data(path: str, workload: str = "long") -> None:
    """3-turn conversations from the demo rows (~200 tokens each; `short`: the rows as they are), as JSONL."""
    from lorakit.train import data as D
    from lorakit.train.config import DEMO_DATA

    if workload == "arithmetic":
        with open(path, "w") as f:
            f.writelines(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                         + "\n" for q, a in arithmetic_items(ARITHMETIC_TRAIN))
        return
    rows = [r for _, r in D.read_rows(DEMO_DATA)]
    if workload == "short":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return
    with open(path, "w") as f:
        for i in range(0, len(rows) - TURNS + 1, TURNS):
            f.write(json.dumps({"messages": [m for r in rows[i:i + TURNS] for m in r["messages"]]}) + "\n")


def peers(device: str) -> tuple[str, ...]:
    """PEFT workers: an fp32 base, and a bf16 base where the device multiplies bf16 natively."""
    if device == "cuda":
        return ("peft", "peft_bf16")
    from lorakit.hardware import cpu_matmul_rates

    rates = cpu_matmul_rates()
    return ("peft", "peft_bf16") if rates["bf16"] >= 0.5 * rates["fp32"] else ("peft",)


PEER_NAMES = {"peft": "PEFT fp32", "peft_bf16": "PEFT bf16"}


def worker(kind: str, steps: int, seed: int, dropout: float, data_path: str, settings: dict | None = None,
           score: bool = False) -> dict:
    import tempfile

    import torch

    from lorakit.train import data as D
    from lorakit.models.loading import load_tokenizer
    from lorakit.train.loop import batch_order
    from lorakit.train.setup import lr_lambda

    torch.manual_seed(seed)
    tokenizer = load_tokenizer("smollm2-135m")
    rows, _ = D.load_examples(data_path, tokenizer, MAX_LEN)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    losses, times, tokens = [], [], []
    counter = GemmRecorder()  # counts the operators of step 2 (excluded from tokens/s with step 1), records its GEMMs
    if kind.startswith("peft"):  # what a PEFT user runs: fp32 (or bf16) model, labels= loss (mean over labelled tokens)
        import peft

        from lorakit.models.loading import load_model

        base = load_model("smollm2-135m", dtype=torch.bfloat16 if kind == "peft_bf16" else torch.float32, device=device)
        model = peft.get_peft_model(base, peft.LoraConfig(**LORA, lora_dropout=dropout))  # adapters in fp32
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, WARMUP, steps, 0.1))
        for step in range(steps):
            if step == 1:
                counter.__enter__()
            start = time.perf_counter()
            idx = batch_order(len(rows), step, BATCH, seed)
            batch = D.collate([rows[i] for i in idx], tokenizer.pad_token_id)
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            times.append(time.perf_counter() - start)
            if step == 1:
                counter.__exit__(None, None, None)
            tokens.append(sum(len(rows[i]) for i in idx))
            print(f"  {kind} step {step + 1}/{steps} loss {losses[-1]:.4f} ({times[-1]:.1f} s)", file=sys.stderr)
    else:  # lorakit's default training path: the library's own loop, default settings
        from lorakit.train.config import TrainConfig
        from lorakit.train import train

        last = [time.perf_counter()]

        def on_step(step, record):
            if step == 2:
                counter.__exit__(None, None, None)
            now = time.perf_counter()
            times.append(now - last[0])
            if step == 1:
                counter.__enter__()
            last[0] = time.perf_counter()
            losses.append(record["train_loss"])
            tokens.append(sum(len(rows[i]) for i in batch_order(len(rows), step - 1, BATCH, seed)))
            print(f"  lorakit step {step}/{steps} loss {losses[-1]:.4f} ({times[-1]:.1f} s)", file=sys.stderr)

        cfg = TrainConfig(data=data_path, prompts=None, output_dir=tempfile.mkdtemp(), max_length=MAX_LEN,
                          batch_size=BATCH, max_steps=steps, lr=LR, warmup_steps=WARMUP, val_fraction=0.0,
                          eval_every=10**6, save_every=10**6, seed=seed, progress=False,
                          lora=dict(**LORA, lora_dropout=dropout), **(settings or {}))
        # step 1's interval includes set-up; it is excluded from tokens/s for both runs anyway
        summary = train(cfg, on_step=on_step)  # picks the GPU when one is visible (distributed.setup)
        model = summary["model"]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # tokens/s over steps 3.. (step 1 is warm-up, step 2 counted kernels); each step ends in loss.item(), a sync
    # the GEMM-only ceiling: step 2's own matrix products run alone (gemm_ceiling.py), over step 2's tokens
    ceiling = tokens[1] / gemm_seconds(counter.gemms)
    result = {"kind": kind, "tokens_per_s": sum(tokens[2:]) / sum(times[2:]), "peak_rss_gb": peak_kb / 2**20,
              "kernels_per_step": counter.total, "matmuls_per_step": counter.matmuls,
              "gemm_ceiling_tokens_per_s": ceiling,
              "losses": losses, "mean_tokens_per_row": sum(len(r) for r in rows) / len(rows),
              "threads": torch.get_num_threads()}
    if device.type == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if score:  # after the peak was read: generation is not training
        result["held_out_accuracy"] = held_out_accuracy(model, tokenizer)
    return result


def run_workers(args, data_path: str, env: dict) -> dict:
    """{kind: [result per seed]}: every worker in its own subprocess, the seeds interleaved so drift hits all."""
    results = {}
    for seed in range(args.seed, args.seed + args.seeds):
        for kind in (*peers(args.device), "lorakit"):
            out = subprocess.run([sys.executable, __file__, "--worker", kind, f"--steps={args.steps}", f"--seed={seed}",
                                  f"--dropout={args.dropout}", f"--data={data_path}",
                                  *(["--score"] if args.workload == "arithmetic" else []),
                                  *(f"--set={item}" for item in args.set)], check=True, stdout=subprocess.PIPE,
                                 text=True, env=env)
            results.setdefault(kind, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def median_run(runs: list[dict]) -> dict:
    """The seed whose tokens/s is the median (its figures kept together), with the accuracy of every seed."""
    chosen = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
    if "held_out_accuracy" in chosen:
        chosen = {**chosen, "held_out_accuracies": [r["held_out_accuracy"] for r in runs],
                  "held_out_accuracy": statistics.mean(r["held_out_accuracy"] for r in runs)}
    return chosen


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--workload", choices=["long", "short", "arithmetic"], default="long",
                    help="long: 3-turn rows of ~230 tokens; short: the demo's single turns (~90 tokens); "
                         "arithmetic: ~50-token sums, scored on held-out sums")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="runs per worker, seeds --seed.. (default 1)")
    ap.add_argument("--dropout", type=float, default=0.0, help="lora_dropout for both (PEFT's default: 0)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "train_vs_peft.json"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra lorakit TrainConfig setting (YAML value), e.g. --set trim_memory=10")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where all runs train (memory on cuda = peak GPU memory)")
    ap.add_argument("--worker", choices=["peft", "peft_bf16", "lorakit"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--score", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 3:
        ap.error(f"--steps must be >= 3 (step 1 warms up, step 2 counts kernels), got {args.steps}")
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    import yaml

    settings = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.seed, args.dropout, args.data, settings, args.score)))
        return
    import tempfile

    data_path = os.path.join(tempfile.mkdtemp(), "bench.jsonl")
    write_bench_data(data_path, args.workload)
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}))
    all_runs = run_workers(args, data_path, env)
    import torch

    from lorakit.hardware import fast_bf16

    if args.device == "cuda" and "peak_gpu_gb" not in all_runs["lorakit"][0]:
        raise SystemExit("--device cuda, but the workers saw no GPU")
    # lorakit computes in bf16 where the device has fast bf16, else in fp32 (hardware.resolve_bf16), unless --set
    # bf16=true/false forces it
    forced = settings.get("bf16")  # "auto" (or absent) leaves the measured choice
    compute = "bf16" if (forced if isinstance(forced, bool) else fast_bf16(args.device)) else "fp32"
    peaks = {"bf16": matmul_peak_gflops(torch.bfloat16, args.device), "fp32": matmul_peak_gflops(torch.float32, args.device)}
    memory, label = ("peak_gpu_gb", "peak GPU GB") if args.device == "cuda" else ("peak_rss_gb", "peak RSS GB")
    # Step 1 runs the untrained adapter (B = 0, the base model) on the first batch in every worker:
    # the losses differ only by bf16 rounding. A larger gap means the workers saw different batches.
    for kind in all_runs:
        for p, k in zip(all_runs[kind], all_runs["lorakit"]):
            gap = abs(k["losses"][0] - p["losses"][0]) / p["losses"][0]
            if gap > 0.01:
                raise SystemExit(f"step-1 losses differ by {100 * gap:.1f} % ({kind} {p['losses'][0]:.4f}, lorakit "
                                 f"{k['losses'][0]:.4f}): the runs did not see the same batches")
    results = {kind: median_run(runs) for kind, runs in all_runs.items()}
    p, k = results["peft"], results["lorakit"]
    step1_gap = abs(k["losses"][0] - p["losses"][0]) / p["losses"][0]
    final = {kind: sum(r["losses"][-5:]) / 5 for kind, r in results.items()}
    # LoRA training FLOPs ~ 4 x (base parameters) per token: forward + activation gradients.
    flops_per_token = 4 * 134.5e6
    dtype_of = {"peft": "fp32", "peft_bf16": "bf16", "lorakit": compute}
    # model FLOPs utilization of each row: its tokens/s x FLOPs per token over the GEMM peak in its compute dtype
    mfu = {kind: r["tokens_per_s"] * flops_per_token / (peaks[dtype_of[kind]] * 1e9) for kind, r in results.items()}
    row_tables = {("peft_fp32" if kind == "peft" else kind): {
        "tokens_per_s": r["tokens_per_s"], "peak_rss_gb": r["peak_rss_gb"], "final_loss": final[kind],
        "kernels_per_step": r["kernels_per_step"], "matmuls_per_step": r["matmuls_per_step"], "mfu": mfu[kind],
        "gemm_ceiling_tokens_per_s": r["gemm_ceiling_tokens_per_s"],
        "fraction_of_gemm_ceiling": r["tokens_per_s"] / r["gemm_ceiling_tokens_per_s"],
        **({"held_out_accuracy": r["held_out_accuracy"], "held_out_accuracies": r["held_out_accuracies"]}
           if "held_out_accuracy" in r else {}),
        **({"peak_gpu_gb": r["peak_gpu_gb"]} if "peak_gpu_gb" in r else {})} for kind, r in results.items()}
    # lorakit against each peer: PEFT fp32 (keys without suffix) and PEFT bf16 (suffix _vs_peft_bf16)
    ratios = {kind: {"speedup": k["tokens_per_s"] / results[kind]["tokens_per_s"],
                     "memory_ratio": k[memory] / results[kind][memory],
                     "final_loss_rel_diff": abs(final["lorakit"] - final[kind]) / final[kind],
                     **({"accuracy_points": 100 * (k["held_out_accuracy"] - results[kind]["held_out_accuracy"])}
                        if "held_out_accuracy" in k else {})}
              for kind in results if kind != "lorakit"}
    peak = peaks[compute]
    fraction = k["tokens_per_s"] * flops_per_token / (peak * 1e9)
    table = {
        "machine": machine_name(args.device), "cpu": cpu_model() if args.device == "cpu" else None,
        "device": args.device, "workload": args.workload, "steps": args.steps, "batch": BATCH, "seeds": args.seeds,
        "lora_dropout": args.dropout, "mean_tokens_per_row": round(k["mean_tokens_per_row"], 1),
        **row_tables,
        **{name + ("" if kind == "peft" else f"_vs_{kind}"): value
           for kind, r in ratios.items() for name, value in r.items()},
        "step1_loss_rel_diff": step1_gap,
        "lorakit_compute_dtype": compute, "matmul_peak_gflops": peak, "lorakit_fraction_of_matmul_peak": fraction,
        # at 100 % of the peak, lorakit's 4 x params FLOPs per token would run at this multiple of PEFT's tokens/s
        "speedup_ceiling_at_peak": peak * 1e9 / flops_per_token / p["tokens_per_s"],
        "loss_curves": {kind: r["losses"] for kind, r in results.items()},
    }
    seeds = f", median of {args.seeds} seeds" if args.seeds > 1 else ""
    print(f"\n{table['machine']}\n{table['cpu'] or ''}\n{args.steps} steps of {BATCH} rows x "
          f"~{table['mean_tokens_per_row']:.0f} tokens, lora_dropout {args.dropout}{seeds}")
    scored = "held_out_accuracy" in k
    print(f"{'':<24}{'tokens/s':>10}{'MFU':>7}{'GEMM ceiling':>13}{'of it':>7}{label:>13}{'final loss':>12}"
          f"{'kernels/step':>14}{'matmuls':>9}" + (f"{'held-out acc':>14}" if scored else ""))
    for kind in results:
        r = results[kind]
        ceiling = r["gemm_ceiling_tokens_per_s"]
        print(f"{PEER_NAMES.get(kind, 'lorakit (' + compute + ')'):<24}{r['tokens_per_s']:>10.0f}{100 * mfu[kind]:>6.1f}%"
              f"{ceiling:>13.0f}{100 * r['tokens_per_s'] / ceiling:>6.1f}%{r[memory]:>13.2f}{final[kind]:>12.4f}"
              f"{r['kernels_per_step']:>14}{r['matmuls_per_step']:>9}"
              + (f"{100 * r['held_out_accuracy']:>13.1f}%" if scored else ""))
    for kind, r in ratios.items():
        print(f"{'lorakit / ' + PEER_NAMES[kind]:<24}{r['speedup']:>9.2f}x{'':>27}{r['memory_ratio']:>12.2f}x"
              f"{100 * r['final_loss_rel_diff']:>10.1f} %" + (f"{r['accuracy_points']:>+35.1f} pts" if scored else ""))
    print(f"{compute} matmul peak {peak:.0f} GFLOP/s; lorakit reaches {100 * fraction:.1f} % of it "
          f"(4 x 134.5 M FLOPs per token); at 100 % it would be {table['speedup_ceiling_at_peak']:.2f}x PEFT fp32")
    print("GEMM ceiling: tokens/s if a step did nothing but its own matrix products (step 2's, each timed alone at "
          "its shapes); 'of it': the row's tokens/s over that")
    from lorakit.utils import atomic_path

    with atomic_path(args.json) as tmp, open(tmp, "w") as f:  # an interrupted run leaves the old JSON
        json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
