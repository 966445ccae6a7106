"""The real server in a subprocess on 127.0.0.1, driven by the official openai client and httpx."""

import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
import openai
import pytest

from lorakit.train import train
from lorakit.train_config import TrainConfig

PROMPT = "Tell me something."


def _train_adapter(tmp_path_factory, model_dir, answer, name):
    """A tiny adapter that answers every prompt with `answer` (trained for a few seconds)."""
    root = tmp_path_factory.getbasetemp() / "adapters"
    data = root / f"{name}.jsonl"
    root.mkdir(exist_ok=True)
    prompts = ["Tell me something.", "Hello?", "What now?", "Any news?", "Say a thing."]
    data.write_text("".join(
        '{"messages": [{"role": "user", "content": "%s"}, {"role": "assistant", "content": "%s"}]}\n' % (p, answer)
        for p in prompts * 4))
    out = root / f"run-{name}"
    train(TrainConfig(model=model_dir, data=str(data), prompts=None, output_dir=str(out), max_steps=80, lr=1e-2,
                      batch_size=4, warmup_steps=2, val_fraction=0.0, bf16=False, progress=False, save_every=1000,
                      lora=dict(r=8, lora_alpha=16, target_modules="all-linear")))
    os.replace(out / "adapter", root / name)
    return str(root / name)


@pytest.fixture(scope="module")
def serve_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama whose output head is large enough to express confident answers."""
    from conftest import tiny_llama_for

    path = tmp_path_factory.mktemp("serve-llama")
    tiny_llama_for(tiny_tokenizer, initializer_range=0.3).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_model_dir):
    tiny_model_dir = serve_model_dir
    yes = _train_adapter(tmp_path_factory, tiny_model_dir, "yes yes yes", "yes")
    no = _train_adapter(tmp_path_factory, tiny_model_dir, "no no no", "no")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", f"--model={tiny_model_dir}",
                             f"--adapter=yes={yes}", f"--adapter-root={os.path.dirname(no)}", f"--port={port}",
                             "--max-tokens-cap=16", "--max-body-bytes=4096", "--max-batch-size=8"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError(proc.stderr.read())
    from transformers import AutoModelForCausalLM

    import lorakit

    dora = lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                  lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(os.path.join(os.path.dirname(no), "dora"))  # under the adapter root
    yield base, os.path.basename(tiny_model_dir)
    proc.terminate()
    proc.wait(10)


def _client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def _chat(client, model, stream=False, **kw):
    kw.setdefault("max_tokens", 6)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                          stream=stream, **kw)


def test_models_chat_stream_and_runtime_adapters(server):
    base, base_name = server
    client = _client(base)
    assert {m.id for m in client.models.list()} == {base_name, "yes"}
    yes = _chat(client, "yes").choices[0].message.content
    assert yes.strip().startswith("yes yes yes")
    streamed = "".join(c.choices[0].delta.content or "" for c in _chat(client, "yes", stream=True))
    assert streamed == yes
    completion = client.completions.create(model="yes", prompt="Hello", max_tokens=3)
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.completion_tokens <= 3
    # load an adapter at runtime (path relative to --adapter-root), then use it
    r = httpx.post(f"{base}/v1/adapters", json={"name": "no", "path": "no"})
    assert r.status_code == 200, r.text
    no = _chat(client, "no").choices[0].message.content
    assert no.strip().startswith("no no no") and no != yes
    base_answer = _chat(client, base_name).choices[0].message.content
    assert not base_answer.strip().startswith(("yes yes", "no no"))
    assert httpx.delete(f"{base}/v1/adapters/no").status_code == 200
    with pytest.raises(openai.NotFoundError):
        _chat(client, "no")


def test_error_cases_are_openai_style_and_server_keeps_serving(server):
    base, _ = server
    client = _client(base)
    with pytest.raises(openai.NotFoundError) as e:
        _chat(client, "nope")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="yes", messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    with pytest.raises(openai.BadRequestError):
        _chat(client, "yes", temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="yes", messages=[], max_tokens=2)
    assert httpx.post(f"{base}/v1/chat/completions", content=b"{not json").status_code == 400
    assert httpx.post(f"{base}/v1/chat/completions", content=b"x" * 5000).status_code == 413
    escape = httpx.post(f"{base}/v1/adapters", json={"name": "evil", "path": "../../etc"})
    assert escape.status_code == 403 and escape.json()["error"]["code"] == "path_outside_root"
    assert httpx.post(f"{base}/v1/adapters", json={"name": "x", "path": "missing"}).status_code == 404
    dora = httpx.post(f"{base}/v1/adapters", json={"name": "d", "path": "dora"})  # cannot join mixed batches
    assert dora.status_code == 400 and dora.json()["error"]["code"] == "unsupported_adapter"
    assert httpx.delete(f"{base}/v1/adapters/nope").status_code == 404
    capped = _chat(client, "yes", max_tokens=1000)  # clipped to --max-tokens-cap, not an error
    assert capped.usage.completion_tokens <= 16
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_bounded_load_mixed_adapters_and_bad_requests(server):
    base, base_name = server
    client = _client(base)
    expected = {m: _chat(client, m).choices[0].message.content for m in ("yes", base_name)}
    kinds = ["yes", base_name, "bad-model", "bad-tokens"] * 50  # 200 requests

    def one(kind):
        start = time.perf_counter()
        try:
            if kind == "bad-model":
                _chat(client, "missing-adapter")
            elif kind == "bad-tokens":
                client.chat.completions.create(model="yes", messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=0)
            else:
                return kind, _chat(client, kind).choices[0].message.content, time.perf_counter() - start
        except openai.APIStatusError as e:
            return kind, e.status_code, time.perf_counter() - start

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, kinds))
    elapsed = time.perf_counter() - started
    assert len(results) == 200
    for kind, answer, _ in results:
        expect = {"bad-model": 404, "bad-tokens": 400}.get(kind, expected.get(kind))
        assert answer == expect, (kind, answer)
    latencies = sorted(r[2] for r in results)
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * len(latencies))]
    print(f"\nload: 200 requests, 16 concurrent: {200 / elapsed:.1f} req/s, p50 {p50 * 1000:.0f} ms, "
          f"p95 {p95 * 1000:.0f} ms")
