"""Billion-parameter models on this machine: peak memory, speed and load time, and the calculator checked.

    python bench/scale.py [--sizes smollm2-360m,llama-3.2-1b,llama-3-8b] [--runs qlora,lora,peft] [--steps 3]

Each size is a random-weight model of that architecture's real shape (lorakit.models.synthetic: bf16
safetensors, written once to the cache; they measure memory and speed, not quality). Each run is its own
process training LoRA r=16 on every linear layer, batch 4 x 512 tokens (packed demo rows), for `--steps`
optimizer steps:
  qlora  lorakit, frozen base in NF4, gradient checkpointing as the memory plan needs (`auto`: the fewest layers
         that make the run fit, none where it fits; dense weights of a checkpointed layer kept for its backward);
  lora   lorakit, frozen base in the compute dtype (bf16 where the CPU has fast bf16, else fp32), the same plan;
  peft   transformers + PEFT, fp32 base, gradient checkpointing (skipped as "does not fit" where its fp32
         weights alone exceed the memory available).
Reported: peak RSS (the process's high-water mark, loading included), time to load (process start to the
first step), seconds per step (mean over steps after the first; the first where only one ran), tokens/s, model
FLOPs utilization (tokens/s x 4 x parameters FLOPs per token, recomputation not counted, over the GEMM peak
measured in the compute dtype), the layers the plan recomputed, and `lorakit calc`'s predicted peak for the same
run and plan with its error. Results merge into the JSON by
(size, run), so sizes can be measured in separate invocations; the table and PNG cover the whole JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import yaml

STARTED = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine_name, matmul_peak_gflops  # noqa: E402

BATCH, LENGTH, RANK, LR = 4, 512, 16, 1e-4
LORA = dict(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules="all-linear")
DEFAULT_SIZES = ("smollm2-360m", "llama-3.2-1b", "llama-3.2-3b", "llama-3-8b")
RUNS = ("qlora", "lora", "peft")
REFUSED_EXIT = 2


def packed_rows(tokenizer):
    """The demo rows packed into 512-token rows (the same rows for every run)."""
    from lorakit.train import data as D
    from lorakit.train.config import DEMO_DATA

    examples, _ = D.load_examples(DEMO_DATA, tokenizer, LENGTH)
    return D.pack(examples, LENGTH)


def lorakit_worker(model_dir: str, run: str, steps: int, memory_gb: float | None = None) -> dict:
    from lorakit.hardware import peak_resident_gb
    from lorakit.train.config import TrainConfig
    from lorakit.train import train

    stamps = []
    cfg = TrainConfig(model=model_dir, prompts=None, output_dir=tempfile.mkdtemp(), max_length=LENGTH, packing=True,
                      batch_size=BATCH, max_steps=steps, lr=LR, warmup_steps=0, val_fraction=0.0, eval_every=10**6,
                      save_every=10**6, progress=False, lora=dict(LORA), gradient_checkpointing="auto",
                      quantize="nf4" if run == "qlora" else None, memory_limit_gb=memory_gb)
    summary = train(cfg, on_step=lambda step, record: stamps.append((time.perf_counter(), record)))
    with open(os.path.join(cfg.output_dir, "config.yaml")) as f:  # the settings the run decided (its plan)
        decided = yaml.safe_load(f)
    plan = decided["checkpoint_layers"] if decided["gradient_checkpointing"] else 0
    layers = summary["model"].get_base_model().config.num_hidden_layers
    first_at, first = stamps[0]
    step_seconds = [b[1]["elapsed_s"] - a[1]["elapsed_s"] for a, b in zip(stamps, stamps[1:])] or [first["elapsed_s"]]
    return {"load_s": first_at - first["elapsed_s"] - STARTED, "seconds_per_step": sum(step_seconds) / len(step_seconds),
            "losses": [r["train_loss"] for _, r in stamps], "peak_rss_gb": peak_resident_gb(),
            "checkpointed_layers": layers if plan is None else plan, "layers": layers,
            "compute": "bf16" if decided["bf16"] else "fp32"}


def peft_worker(model_dir: str, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.train import data as D
    from lorakit.hardware import peak_resident_gb
    from lorakit.models.loading import load_tokenizer
    from lorakit.train.loop import batch_order

    tokenizer = load_tokenizer(model_dir)
    rows = packed_rows(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    loaded, times, losses = time.perf_counter(), [], []
    for step in range(steps):
        start = time.perf_counter()
        batch = D.collate([rows[i] for i in batch_order(len(rows), step, BATCH, 0)], tokenizer.pad_token_id)
        loss = model(**batch).loss  # input_ids, labels (HF's shift inside), packed rows' position_ids
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    later = times[1:] or times
    layers = model.get_base_model().config.num_hidden_layers
    return {"load_s": loaded - STARTED, "seconds_per_step": sum(later) / len(later), "losses": losses,
            "peak_rss_gb": peak_resident_gb(), "checkpointed_layers": layers, "layers": layers, "compute": "fp32"}


def predicted_peak_gb(r: dict) -> float | None:
    """`lorakit calc`'s predicted peak for this run and its checkpointing plan (None for PEFT, which the calculator
    does not model; results measured before plans were recorded checkpointed every layer)."""
    from lorakit import calc

    if r["run"] == "peft":
        return None
    arch = calc.ARCHITECTURES[r["size"]]
    recomputed = r.get("checkpointed_layers", arch.layers)
    return calc.predict_run(arch, calc.RunShape(
        storage="nf4" if r["run"] == "qlora" else None, compute=r.get("compute", "fp32"), batch=BATCH, length=LENGTH,
        rank=RANK, gradient_checkpointing=recomputed > 0, checkpointed_layers=recomputed))["total"]


def measure(size: str, run: str, steps: int, memory_gb: float | None = None) -> dict:
    from lorakit.calc import get_arch
    from lorakit.models.synthetic import synthetic_model_dir
    from lorakit.train.memory_check import available_gb

    model_dir = synthetic_model_dir(size)
    params = get_arch(model_dir).base_params()
    entry = {"size": size, "run": run, "params": params, "steps": steps, "machine": machine_name(),
             **({"memory_limit_gb": memory_gb} if memory_gb else {})}
    if run == "peft" and params * 4 / 1e9 > 0.9 * (available_gb() or float("inf")):
        return {**entry, "status": f"does not fit: fp32 weights {params * 4 / 1e9:.1f} GB"}
    print(f"{size} {run}: {steps} steps ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, __file__, "--worker", run, "--model-dir", model_dir, f"--steps={steps}",
                           *([f"--memory-gb={memory_gb}"] if memory_gb else [])],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode == REFUSED_EXIT:
        return {**entry, "status": "refused: " + proc.stderr.strip().splitlines()[-1]}
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        return {**entry, "status": f"failed (exit {proc.returncode})"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch

    peak = matmul_peak_gflops(torch.bfloat16 if result["compute"] == "bf16" else torch.float32)
    tokens_per_s = BATCH * LENGTH / result["seconds_per_step"]
    entry.update(result, status="ok", tokens_per_s=tokens_per_s, matmul_peak_gflops=peak,
                 mfu=tokens_per_s * 4 * params / (peak * 1e9))
    return entry


def with_predictions(results: list[dict]) -> list[dict]:
    """Each result with the calculator's current prediction and its error (recomputed: the memory model may have
    changed since the measurement)."""
    out = []
    for r in results:
        predicted = predicted_peak_gb(r)
        error = predicted / r["peak_rss_gb"] - 1 if predicted is not None and r["status"] == "ok" else None
        out.append({**r, "predicted_peak_gb": predicted, "calc_error": error})
    return out


def table(results: list[dict]) -> str:
    head = ("| model | params | run | recomputed layers | peak RSS GB | calc GB (error) | load s | s/step | tokens/s "
            "| MFU | status |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in sorted(results, key=lambda r: (r["params"], RUNS.index(r["run"]))):
        ok = r["status"] == "ok"
        calc_cell = (f"{r['predicted_peak_gb']:.2f}" + (f" ({100 * r['calc_error']:+.0f} %)" if ok else "")
                     if r["predicted_peak_gb"] is not None else "—")
        plan = (f"{r['checkpointed_layers']} of {r['layers']}" if "layers" in r else "all") + (
            f" (planned for {r['memory_limit_gb']:g} GB)" if r.get("memory_limit_gb") else "")
        cells = [r["size"], f"{r['params'] / 1e9:.2f} B", r["run"], plan if ok else "—",
                 f"{r['peak_rss_gb']:.2f}" if ok else "—", calc_cell,
                 f"{r['load_s']:.0f}" if ok else "—", f"{r['seconds_per_step']:.0f}" if ok else "—",
                 f"{r['tokens_per_s']:.1f}" if ok else "—", f"{100 * r['mfu']:.0f} %" if "mfu" in r else "—",
                 "ok" if ok else r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, color in zip(RUNS, ("tab:blue", "tab:orange", "tab:gray")):
        done = sorted((r for r in results if r["run"] == run and r["status"] == "ok"), key=lambda r: r["params"])
        if not done:
            continue
        sizes = [r["params"] / 1e9 for r in done]
        ax.plot(sizes, [r["peak_rss_gb"] for r in done], "o-", color=color, label=f"{run}: measured")
        predicted = [(s, r["predicted_peak_gb"]) for s, r in zip(sizes, done) if r["predicted_peak_gb"] is not None]
        if predicted:
            ax.plot(*zip(*predicted), "x--", color=color, label=f"{run}: lorakit calc")
    ax.set_xscale("log")
    sizes = sorted({r["params"] / 1e9 for r in results if r["status"] == "ok"})
    ax.set_xticks(sizes, [f"{s:.2f}" for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("base parameters (billions)")
    ax.set_ylabel("peak RSS (GB)")
    ax.set_title(f"LoRA r={RANK}, all linear layers, batch {BATCH} x {LENGTH}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="calc architecture names, comma-separated")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {','.join(RUNS)}")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--memory-gb", type=float, default=None,
                    help="the memory lorakit's runs may plan for (memory_limit_gb; default: what is available)")
    ap.add_argument("--json", default=os.path.join(HERE, "scale.json"))
    ap.add_argument("--png", default=os.path.join(HERE, "scale.png"))
    ap.add_argument("--page", default=os.path.join(HERE, "..", "docs", "benchmarks", "avx2-epyc.md"),
                    help="write the table between this Markdown file's scale markers ('' to skip)")
    ap.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        from lorakit.train.memory_check import MemoryRefusal

        try:
            out = peft_worker(args.model_dir, args.steps) if args.worker == "peft" else \
                lorakit_worker(args.model_dir, args.worker, args.steps, args.memory_gb)
        except MemoryRefusal as e:  # lorakit's memory check refusing the run (any other error is a failure)
            print(e, file=sys.stderr)
            sys.exit(REFUSED_EXIT)
        print(json.dumps(out))
        return
    runs = args.runs.split(",")
    if bad := sorted(set(runs) - set(RUNS)):
        ap.error(f"unknown runs {bad}: choose from {list(RUNS)}")
    previous = json.load(open(args.json)) if os.path.isfile(args.json) else []
    results = {(r["size"], r["run"]): r for r in previous}
    for size in args.sizes.split(","):
        for run in runs:
            results[size, run] = measure(size, run, args.steps, args.memory_gb)
            with open(args.json + ".tmp", "w") as f:
                json.dump(list(results.values()), f, indent=1)
            os.replace(args.json + ".tmp", args.json)
    final = with_predictions(list(results.values()))
    print(table(final))
    plot(final, args.png)
    if args.page:
        write_page_table(args.page, table(final))


def write_page_table(page: str, text: str) -> None:
    """Put the table between the page's `<!-- scale:start -->` / `<!-- scale:end -->` markers."""
    with open(page, encoding="utf-8") as f:
        content = f.read()
    start, end = "<!-- scale:start -->\n", "<!-- scale:end -->"
    if start not in content or end not in content:
        raise SystemExit(f"{page} has no {start.strip()} / {end} markers")
    head, rest = content.split(start, 1)
    with open(page + ".tmp", "w", encoding="utf-8") as f:
        f.write(head + start + text + "\n" + end + rest.split(end, 1)[1])
    os.replace(page + ".tmp", page)


if __name__ == "__main__":
    main()
