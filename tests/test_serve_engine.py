"""The serving engine in-process (no HTTP): continuous batching, chunked prefill, the prefix cache, adapter
paging and DoRA rows, checked token for token against a reference that recomputes the whole sequence at every
step with no cache (fp32), and against real PEFT for DoRA."""

import asyncio
import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.layers.mixed_batch import any_form_rows
from lorakit.serve.engine import Engine, ServeConfig
from lorakit.serve.errors import InvalidRequest
from lorakit.variants.adalora import AdaLoraConfig
from lorakit.variants.vera import VeraConfig

from conftest import randomize_adapters

# lora_bias on the tiny Llama's bias-free layers warns that merging will not be possible: serving does not merge
pytestmark = pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")


def _save_adapter(model_dir, path, seed, config=None, **settings):
    """An adapter with random (non-zero) factors, saved as PEFT files; for DoRA the magnitude is near ||W||."""
    config = config or lorakit.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **settings})
    model = lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    magnitudes = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    randomize_adapters(model, seed=seed, scale=0.3)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in magnitudes:
                p.copy_(magnitudes[name] * (1 + 0.2 * torch.randn(p.shape, generator=gen)))
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, serve_model_dir):
    root = tmp_path_factory.mktemp("adapter-root")
    for i in range(4):
        _save_adapter(serve_model_dir, root / f"lora{i}", seed=10 + i)
    _save_adapter(serve_model_dir, root / "dora", seed=20, use_dora=True)
    # every other form lorakit trains: VeRA, AdaLoRA, LoRA with a bias on B (unmixable in PEFT), rsLoRA + ranks
    _save_adapter(serve_model_dir, root / "vera", 21, VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    _save_adapter(serve_model_dir, root / "adalora", 22, AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                                       target_modules=["q_proj", "v_proj"]))
    _save_adapter(serve_model_dir, root / "bias", seed=23, lora_bias=True)
    _save_adapter(serve_model_dir, root / "rslora", seed=24, use_rslora=True, rank_pattern={"q_proj": 2})
    return str(root)


def _engine(model_dir, adapters=(), **settings):
    settings.setdefault("dtype", "fp32")
    return Engine(ServeConfig(model=model_dir, adapters=dict(adapters), playground=False, **settings))


async def _generate(engine, ids, adapter, max_tokens, delay=0.0):
    await asyncio.sleep(delay)
    job = engine.submit(ids, adapter, max_tokens, ignore_eos=True)
    tokens = []
    while True:
        item = await job.out.get()
        if isinstance(item, Exception):
            raise item
        tokens.append(item[0])
        if item[1]:
            return tokens


def _run_all(engine, requests):
    """requests: (ids, adapter, max_tokens, delay) -> each one's tokens, all submitted concurrently."""
    async def main():
        return await asyncio.gather(*(_generate(engine, *r) for r in requests))
    return asyncio.run(main())


def _greedy_without_cache(model, ids, adapter, max_tokens):
    """The reference: the whole sequence recomputed at every step, no KV cache, the adapter set per row
    ("peft": a PEFT model, its active adapter). Tokens past end-of-text included (the engine's ignore_eos)."""
    seq, rows = list(ids), {} if adapter == "peft" else {"adapter_names": [adapter]}
    with torch.inference_mode(), any_form_rows():
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False, **rows).logits
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


def _requests(vocab, adapters, n, seed):
    """Mixed prompt lengths (3..70 tokens: several prefill chunks), a shared 40-token header on half of them
    (prefix-cache hits), answer lengths 1..24, staggered arrivals, adapters round-robin with base rows."""
    rng = random.Random(seed)
    header = [rng.randrange(3, vocab) for _ in range(40)]
    out = []
    for i in range(n):
        body = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 30))]
        ids = header + body if i % 2 else body
        out.append((ids, adapters[i % len(adapters)], rng.randint(1, 24), rng.uniform(0, 0.15)))
    return out


def test_greedy_answers_equal_the_request_alone_and_the_uncached_reference(serve_model_dir, adapter_root):
    names = ["lora0", "lora1", "dora", "lora2", "vera", "adalora", "bias", "rslora"]
    adapters = {n: os.path.join(adapter_root, n) for n in names}
    engine = _engine(serve_model_dir, adapters.items(), max_batch_size=4, prefill_chunk=16, max_loras=3)
    requests = _requests(len(engine.tokenizer), [None, *names], 27, seed=0)
    together = _run_all(engine, requests)
    assert engine.prefix_cache.hits >= 3  # the shared header was reused ...
    chunked = [r for r in requests if len(r[0]) > 16]
    assert len(chunked) >= 5  # ... and long prompts took several prefill chunks
    for (ids, adapter, n, _), tokens in zip(requests, together):
        alone = _run_all(engine, [(ids, adapter, n, 0.0)])[0]  # submitted to the idle engine
        assert tokens == alone, (adapter, len(ids))
        assert tokens == _greedy_without_cache(engine.model, ids, adapter, n), (adapter, len(ids))


def test_a_short_request_finishes_while_a_long_one_is_still_decoding(serve_model_dir, adapter_root):
    """Continuous batching: a request arriving during a 200-token decode joins it and leaves when done."""
    engine = _engine(serve_model_dir, [("lora0", os.path.join(adapter_root, "lora0"))])
    order = []

    async def tracked(name, *request):
        tokens = await _generate(engine, *request)
        order.append(name)
        return tokens

    async def main():
        return await asyncio.gather(tracked("long", [5, 6, 7], "lora0", 200),
                                    tracked("short", [8, 9, 10, 11], None, 4, 0.05))
    long, short = asyncio.run(main())
    assert order == ["short", "long"] and len(long) == 200 and len(short) == 4
    assert short == _greedy_without_cache(engine.model, [8, 9, 10, 11], None, 4)


def test_dora_rows_equal_peft_dora_also_mixed_with_lora_rows(serve_model_dir, adapter_root):
    from peft import PeftModel

    peft_models = {n: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(serve_model_dir),
                                                os.path.join(adapter_root, n)).eval() for n in ("dora", "lora1")}
    engine = _engine(serve_model_dir, [(n, os.path.join(adapter_root, n)) for n in ("dora", "lora1")])
    ids = torch.tensor([[5, 9, 14, 3, 22, 7, 31, 8], [11, 4, 6, 19, 2, 40, 17, 12], [7, 7, 9, 30, 21, 5, 3, 16]])
    rows = ["dora", "lora1", "dora"]
    with torch.inference_mode(), any_form_rows():  # one mixed batch, as the scheduler decodes it
        ours = engine.model(input_ids=ids, adapter_names=rows).logits
    for i, name in enumerate(rows):
        with torch.inference_mode():
            theirs = peft_models[name](input_ids=ids[i:i + 1]).logits[0]
        scale = theirs.abs().max()
        assert (ours[i] - theirs).abs().max() <= 1e-5 * scale, name
    requests = [(ids[i].tolist(), name, 12, 0.0) for i, name in enumerate(rows)]
    for (prompt, name, n, _), tokens in zip(requests, _run_all(engine, requests)):
        assert tokens == _greedy_without_cache(peft_models[name], prompt, "peft", n), name


def test_32_adapters_paged_through_8_in_memory_and_4_per_batch(serve_model_dir, tmp_path):
    root = tmp_path / "root"
    for i in range(32):
        _save_adapter(serve_model_dir, root / f"a{i}", seed=100 + i, target_modules=["q_proj", "v_proj"])
    engine = _engine(str(serve_model_dir), adapter_root=str(root), max_cpu_loras=8, max_loras=4, max_batch_size=8)
    peak = {"resident": 0, "per_batch": 0}
    step = engine.scheduler._decode

    def watched_decode():  # record how many adapters are in memory and in the batch at every step
        peak["resident"] = max(peak["resident"], len(engine.pool.resident))
        peak["per_batch"] = max(peak["per_batch"], len({j.adapter for j in engine.scheduler.running}))
        step()
    engine.scheduler._decode = watched_decode
    requests = [([3 + i, 9, 27, 4 + i % 5], f"a{i % 32}", 6, 0.0) for i in range(64)]
    for name in {r[1] for r in requests}:
        assert engine.resolve(name) == name  # found under --adapter-root by name (lazy)
    answers = _run_all(engine, requests)
    assert peak["resident"] <= 8 and peak["per_batch"] <= 4 and engine.pool.evictions >= 24
    reference = AutoModelForCausalLM.from_pretrained(serve_model_dir)
    for (ids, name, n, _), tokens in zip(requests[:32], answers[:32]):  # each against its adapter on its own
        model = lorakit.LoraModel.from_pretrained(reference, str(root / name))
        assert tokens == _greedy_without_cache(model, ids, "default", n), name
        reference = model.unload()
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in engine.model.named_parameters() if "lora_" in n)
    one = engine.details[next(iter(engine.pool.resident))]["bytes"]
    assert adapter_bytes <= 8 * one  # the model holds at most 8 adapters' tensors


def test_requests_beyond_the_kv_budget_wait_and_a_request_larger_than_it_is_refused(serve_model_dir, adapter_root):
    probe = _engine(serve_model_dir)
    per_row = 40 * probe.column_bytes  # 20 prompt tokens + 20 answer tokens
    engine = _engine(serve_model_dir, [("lora0", os.path.join(adapter_root, "lora0"))],
                     kv_cache_gb=2.5 * per_row / (1 << 30), prefix_cache_gb=0)
    peak = [0]
    step = engine.scheduler._decode

    def watched_decode():
        peak[0] = max(peak[0], len(engine.scheduler.running))
        step()
    engine.scheduler._decode = watched_decode
    requests = [([3 + i] * 20, "lora0" if i % 2 else None, 20, 0.0) for i in range(6)]
    answers = _run_all(engine, requests)
    assert peak[0] == 2  # two rows fit the budget, the others waited for them
    for (ids, adapter, n, _), tokens in zip(requests, answers):
        assert tokens == _greedy_without_cache(engine.model, ids, adapter, n)

    async def too_long():
        return engine.submit([5] * 50, None, 60)
    with pytest.raises(InvalidRequest, match="kv-cache-gb"):
        asyncio.run(too_long())
