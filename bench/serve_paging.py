"""Adapter paging in `lorakit serve`: 32 adapters under --adapter-root, at most 8 in memory and 4 per batch.

    python bench/serve_paging.py [--adapters 32] [--json out.json]

SmolLM2-135M, 32 LoRA adapters (r=16 on q,k,v,o,gate,up,down, random B, ~19.5 MB each in fp32) saved under an
adapter root and loaded lazily by name. Three servers, one after another, each sent the same requests (every
adapter twice, in two passes, 8 at a time, 8 greedy tokens):
- `--max-cpu-loras 8 --max-loras 4` (paged: adapters unloaded least-recently-used and loaded again);
- `--max-cpu-loras 32` (all resident: the reference answers);
- base only (the same number of requests on the base model: the memory floor).
Shown: every answer of the paged server equals the all-resident server's (same adapter, same tokens), the
peak RSS (VmHWM) of each server, and the paged server's peak above the floor in adapters' worth.
"""

import argparse
import asyncio
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import httpx
import torch
from common import LORA, free_port, machine_name, randomize_lora_B, wait_for_health

import lorakit
from lorakit.models.loading import load_model


def save_adapters(root: str, n: int) -> int:
    """n adapters under root (a0 .. a{n-1}); returns one adapter's tensor bytes."""
    base = load_model("smollm2-135m", dtype=torch.float32)
    for i in range(n):
        torch.manual_seed(i)
        model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**LORA))
        randomize_lora_B(model, std=0.05)
        model.save_pretrained(os.path.join(root, f"a{i}"))
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "lora_" in name)


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


async def ask_all(base: str, models: list[str]) -> list[str]:
    limit = asyncio.Semaphore(8)

    async def one(client, model, i):
        async with limit:
            r = await client.post(base + "/v1/completions", timeout=600, json={
                "model": model, "prompt": f"Request {i}: tell me about the river.", "max_tokens": 8,
                "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, (model, r.text)
            return r.json()["choices"][0]["text"]
    async with httpx.AsyncClient() as client:
        return await asyncio.gather(*(one(client, m, i % (len(models) // 2)) for i, m in enumerate(models)))


def run_server(root: str, models: list[str], *flags: str) -> tuple[list[str], int, float]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model=smollm2-135m", f"--port={port}",
                             "--dtype=fp32", f"--adapter-root={root}", "--no-playground", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, proc, 120)
        start = time.perf_counter()
        answers = asyncio.run(ask_all(base, models))
        wall = time.perf_counter() - start
        return answers, peak_rss(proc.pid), wall
    finally:
        proc.terminate()
        proc.wait(30)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="serve-paging-")
    try:
        one = save_adapters(root, args.adapters)
        models = [f"a{i}" for i in range(args.adapters)] * 2
        paged, paged_rss, paged_wall = run_server(root, models, "--max-cpu-loras=8", "--max-loras=4")
        resident, resident_rss, resident_wall = run_server(root, models, f"--max-cpu-loras={args.adapters}")
        _, floor_rss, _ = run_server(root, ["smollm2-135m"] * len(models))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    same = sum(a == b for a, b in zip(paged, resident))
    distinct = len(set(resident[: args.adapters]))
    mb = 1 << 20
    print(f"\n`lorakit serve` adapter paging, SmolLM2-135M fp32, {args.adapters} adapters of {one / mb:.1f} MB "
          f"({machine_name()})\n")
    print("| server | requests | answers equal to all-resident | peak RSS | above base-only floor | wall |")
    print("|---|---|---|---|---|---|")
    print(f"| --max-cpu-loras 8 --max-loras 4 | {len(models)} | {same}/{len(models)} | {paged_rss / mb:.0f} MB | "
          f"{(paged_rss - floor_rss) / mb:.0f} MB = {(paged_rss - floor_rss) / one:.1f} adapters | "
          f"{paged_wall:.1f} s |")
    print(f"| --max-cpu-loras {args.adapters} | {len(models)} | (reference) | {resident_rss / mb:.0f} MB | "
          f"{(resident_rss - floor_rss) / mb:.0f} MB = {(resident_rss - floor_rss) / one:.1f} adapters | "
          f"{resident_wall:.1f} s |")
    print(f"| base only | {len(models)} | | {floor_rss / mb:.0f} MB | | |")
    print(f"\ndistinct answers over the {args.adapters} adapters: {distinct}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_name(), "adapter_bytes": one, "paged_rss": paged_rss,
                       "resident_rss": resident_rss, "floor_rss": floor_rss, "equal": same,
                       "requests": len(models), "distinct": distinct}, f, indent=1)


if __name__ == "__main__":
    main()
