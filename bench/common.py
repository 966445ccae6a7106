"""Shared set-up for the benchmarks: SmolLM2 with the same LoRA config in lorakit and PEFT."""

import copy
import os
import platform
import statistics
import time

import peft
import torch

import lorakit

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, lora_alpha=32, target_modules=TARGETS)  # the configuration every benchmark uses


def paired_models(base, adapter_name="default"):
    """(lorakit model, PEFT model), each on its own copy of `base`, with the LORA config."""
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**LORA), adapter_name)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA), adapter_name)
    return ours, theirs


def randomize_lora_B(model, std):
    """Fresh adapters are the identity (B = 0); give B values so the adapter path does real work."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)


def copy_lora_weights(ours, theirs):
    """Load lorakit's adapter weights into a PEFT model holding the same adapters."""
    result = theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k},
                                    strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


def median_rates(runs: dict, rounds: int, tokens: int):
    """Run each zero-argument fn in `runs` once per round, interleaved (so drift hits all alike), under
    inference_mode. Returns ({name: median tokens/s}, {name: last output}) with `tokens` generated per call."""
    rates, outputs = {name: [] for name in runs}, {}
    for _ in range(rounds):
        for name, fn in runs.items():
            with torch.inference_mode():
                start = time.perf_counter()
                outputs[name] = fn()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # GPU work is asynchronous: time it to completion
                rates[name].append(tokens / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}, outputs


def machine_name(device: str = "cpu") -> str:
    """What the figures were measured on: the GPU (on cuda), the CPU, its cores and torch."""
    from lorakit.hardware import fast_bf16

    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}; {cpu}"
    return f"{cpu}, {torch.get_num_threads()} threads, fast bf16: {fast_bf16()}"


def matmul_peak_gflops(dtype, device: str = "cpu") -> float:
    """Measured matmul throughput of this machine in `dtype` (the physical limit for the fraction)."""
    import torch

    size = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    best, n = 0.0, 4
    for _ in range(5):  # the peak is the best of several timings: a busy moment only lowers one of them
        start = time.perf_counter()
        for _ in range(n):
            a @ b
        sync()
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start) / 1e9)
    return best


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server started next)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(base: str, proc, timeout_s: float = 300, log=None) -> None:
    """Poll `base`/health until it answers 200; a server that exits or never answers raises with its log's tail."""
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    tail = ""
    if log is not None:
        log.seek(0)
        tail = log.read()[-4000:]
    raise RuntimeError(f"{base} did not become healthy within {timeout_s:.0f} s\n{tail}")
