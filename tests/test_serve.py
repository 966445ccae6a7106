"""The real server in a subprocess on 127.0.0.1, driven by the official openai client and httpx."""

import collections
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import openai
import pytest
import torch


PROMPT = "Tell me something."


def _start_server(model_dir, *args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would block the server on its next warning
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "lorakit", "serve", f"--model={model_dir}",
                             f"--port={port}", *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=log, text=True)
    proc.log = log
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(server_log(proc))


def server_log(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


@pytest.fixture(scope="module")
def server(serve_model_dir, adapters):
    tiny_model_dir = serve_model_dir
    yes, no = adapters
    proc, base = _start_server(tiny_model_dir, f"--adapter=yes={yes}", f"--adapter-root={os.path.dirname(no)}",
                               "--max-tokens-cap=16", "--max-body-bytes=4096", "--max-batch-size=8")
    from transformers import AutoModelForCausalLM

    import lorakit

    dora = lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                  lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(os.path.join(os.path.dirname(no), "dora"))  # under the adapter root
    os.makedirs(os.path.join(os.path.dirname(no), "prefix"), exist_ok=True)  # a PEFT form lorakit does not train
    with open(os.path.join(os.path.dirname(no), "prefix", "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}, f)
    yield base, os.path.basename(tiny_model_dir)
    print(server_log(proc)[-6000:])  # shown by pytest when a test using this server failed
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def long_server(serve_model_dir, adapters):
    """A server that decodes long answers (cap 512 tokens), adapters loaded at runtime from the root. In fp32:
    its answers are compared with a reference's up to the first near-tie (`_stable_greedy_prefix`), and bf16's
    rounding (2^-8) would put that tie within the first few tokens."""
    proc, base = _start_server(serve_model_dir, f"--adapter-root={os.path.dirname(adapters[0])}",
                               "--max-tokens-cap=512", "--max-batch-size=4", "--dtype=fp32")
    yield base, os.path.basename(serve_model_dir)
    proc.terminate()
    proc.wait(10)


def _client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def _stable_greedy_prefix(model_dir, max_tokens, min_gap=1e-3):
    """The base model's greedy answer up to its first near-tie: the text of the tokens before the first step
    whose top two logits are within `min_gap`. From there on, the summation order of a batch of another shape
    (rows of other requests beside it) may pick either token, so only this prefix is the same on every CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.chat import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = render_prompt([{"role": "user", "content": PROMPT}], tokenizer)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    stable = 0
    for logits in out.logits:
        top2 = logits[0].topk(2).values
        if top2[0] - top2[1] < min_gap:
            break
        stable += 1
    prefix = tokenizer.decode(out.sequences[0, ids.shape[1]:ids.shape[1] + stable], skip_special_tokens=True)
    return prefix.rstrip("\ufffd")  # a cut through a multi-byte character decodes as U+FFFD


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
    assert "no" not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):  # not loaded, and no directory of that name under the root
        _chat(client, "nope")
    # a request naming a directory under --adapter-root loads it on first use (vLLM's lazy resolution)
    assert _chat(client, "no").choices[0].message.content == no
    assert "no" in {m.id for m in client.models.list()}
    assert httpx.delete(f"{base}/v1/adapters/no").status_code == 200


def test_stop_seed_top_p_and_usage_are_honoured_and_the_rest_refused_by_name(server):
    base, _ = server
    client = _client(base)
    full = _chat(client, "yes", max_tokens=8).choices[0].message.content  # "yes yes yes ..."
    for stream in (False, True):
        if stream:
            chunks = list(_chat(client, "yes", stream=True, max_tokens=8, stop=[" yes", "zzz"],
                                stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
        else:
            answer = _chat(client, "yes", max_tokens=8, stop=" yes").choices[0]
            text, finish = answer.message.content, answer.finish_reason
        assert full.startswith(text + " yes") and " yes" not in text and finish == "stop", (text, full)
    sampled = [_chat(client, "yes", max_tokens=8, temperature=1.5, top_p=0.9, seed=11).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed, the same tokens
    for refused in (dict(logprobs=True), dict(extra_body={"mirostat": 2}), dict(stop=["a", "b", "c", "d", "e"])):
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, "yes", **refused)
        assert any(k in e.value.body["message"] for k in ("logprobs", "mirostat", "stop")), e.value.body


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
    prefix = httpx.post(f"{base}/v1/adapters", json={"name": "p", "path": "prefix"})  # not a LoRA form
    assert prefix.status_code == 400 and prefix.json()["error"]["code"] == "bad_adapter", prefix.text
    assert "PREFIX_TUNING" in prefix.json()["error"]["message"]
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


def test_deleting_an_adapter_lets_accepted_requests_finish_and_refuses_later_ones(long_server, serve_model_dir):
    """Requests for `ad1`, `yes` and the base are queued (more than one batch); DELETE ad1 meanwhile:
    every accepted request is answered by its own adapter, later ones for ad1 get 404, and the name is
    free again once its requests are done."""
    base, base_name = long_server
    client = _client(base)
    try:
        for name, path in (("ad1", "no"), ("yes", "yes")):
            assert httpx.post(f"{base}/v1/adapters", json={"name": name, "path": path}).status_code == 200
        expected = {m: _chat(client, m, max_tokens=40).choices[0].message.content
                    for m in ("ad1", "yes", base_name)}
        assert expected["ad1"] != expected["yes"] != expected[base_name]
        base_prefix = _stable_greedy_prefix(serve_model_dir, 40)  # the random base's answer has near-ties
        print(f"base answer {expected[base_name]!r}, the same on every CPU up to {base_prefix!r}")
        assert len(base_prefix) >= 5 and expected[base_name].startswith(base_prefix), (base_prefix, expected)
        kinds = ["ad1", "yes", base_name] * 6  # 18 requests, batches of 4: most are queued when DELETE arrives

        def one(kind):
            try:
                return kind, _chat(client, kind, max_tokens=40).choices[0].message.content
            except openai.APIStatusError as e:
                return kind, e.status_code

        with concurrent.futures.ThreadPoolExecutor(18) as pool:
            futures = [pool.submit(one, k) for k in kinds]
            time.sleep(0.3)  # the requests are in
            deleted = httpx.delete(f"{base}/v1/adapters/ad1")
            assert deleted.status_code == 200 and deleted.json()["deleted"] is True
            with pytest.raises(openai.NotFoundError):  # from now on: 404, never another adapter's answer
                _chat(client, "ad1")
            results = [f.result() for f in futures]
        for kind, answer in results:  # accepted before the delete: answered by ad1 itself
            if kind == base_name:  # the same as alone up to its first near-tie, and no adapter's answer
                assert answer.startswith(base_prefix) and answer not in (expected["ad1"], expected["yes"]), answer
            else:
                assert answer == expected[kind], (kind, answer)
        assert "ad1" not in {m.id for m in client.models.list()}
        assert httpx.post(f"{base}/v1/adapters", json={"name": "ad1", "path": "yes"}).status_code == 200
        assert _chat(client, "ad1", max_tokens=40).choices[0].message.content == expected["yes"]
    finally:  # the next test on this server starts with no runtime adapters, whatever failed here
        statuses = [httpx.delete(f"{base}/v1/adapters/{name}").status_code for name in ("ad1", "yes")]
    assert statuses == [200, 200]


def test_a_disconnected_stream_stops_decoding_at_once(long_server):
    """A client that leaves a 500-token stream after the first chunk must not hold the batch: the next short
    request is answered in a fraction of the time the 500 tokens take."""
    base, base_name = long_server
    client = _client(base)
    body = {"model": base_name, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 500,
            "ignore_eos": True}
    start = time.perf_counter()
    full = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).json()
    full_seconds = time.perf_counter() - start
    assert full["usage"]["completion_tokens"] == 500
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # leave after the first chunk: the connection closes
    start = time.perf_counter()
    _chat(client, base_name, max_tokens=3)
    after = time.perf_counter() - start
    assert after < 0.5 * full_seconds, (after, full_seconds)


def test_malformed_requests_get_openai_style_4xx_never_500(server):
    base, base_name = server
    cases = [
        ("POST", "/v1/chat/completions", dict(content=b'{"model": "caf\xe9"}'), 400, "invalid_json"),  # not UTF-8
        ("POST", "/v1/adapters", dict(json={"name": "x", "path": "a\x00b"}), 400, "invalid_path"),
        ("POST", "/v1/adapters", dict(json={"name": "a.b", "path": "no"}), 400, "invalid_name"),
        ("POST", "/v1/adapters", dict(json={"name": "..", "path": "no"}), 400, "invalid_name"),
        ("GET", "/v1/nothing-here", {}, 404, "unknown_route"),
        ("DELETE", "/v1/models", {}, 405, "method_not_allowed"),
        ("POST", "/v1/chat/completions", dict(json={"model": base_name, "n": 5, "messages": [
            {"role": "user", "content": "hi"}]}), 400, "invalid_n"),
    ]
    for method, path, kw, status, code in cases:
        r = httpx.request(method, f"{base}{path}", **kw)
        assert r.status_code == status, (path, r.status_code, r.text)
        error = r.json()["error"]
        assert error["code"] == code and error["message"] and error["type"], r.text
    assert httpx.get(f"{base}/health").status_code == 200


def test_fuzz_http_bodies(server):
    """Random JSON bodies (fields of the API with random values) and random bytes: a 2xx or an OpenAI-style
    4xx every time, never a 500, and the server keeps answering."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base, base_name = server
    values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                          | st.text(max_size=10),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=5)
    fields = st.sampled_from(["model", "messages", "prompt", "max_tokens", "temperature", "stream", "n", "name",
                              "path", "top_p", "stop"])
    good = {"model": base_name, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "max_tokens": 2}
    outcomes = {}

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/adapters"]),
           changes=st.dictionaries(fields, values, max_size=3), raw=st.one_of(st.none(), st.binary(max_size=40)))
    def one(route, changes, raw):
        kw = dict(content=raw) if raw is not None else dict(json={**good, **changes})
        r = httpx.post(f"{base}{route}", timeout=60, **kw)
        assert r.status_code < 500, (route, changes, raw, r.text)
        if r.status_code >= 400:
            error = r.json()["error"]
            assert error["message"] and error["code"], r.text
        outcomes[r.status_code] = outcomes.get(r.status_code, 0) + 1

    one()
    assert httpx.get(f"{base}/health").status_code == 200
    print(f"\nHTTP fuzz outcomes by status: {dict(sorted(outcomes.items()))}")


def test_load_1000_requests_with_adapters_coming_and_going_and_streams_dropped(long_server):
    """1,000 requests, 32 at a time, over the base and adapters that are loaded and deleted during the run;
    one streaming client in ten leaves after the first chunk. Every request gets its adapter's answer or a
    clean 404 (only for an adapter deleted before it was accepted), none is lost, and afterwards requests
    are as fast as before (none slower than 3x the median measured before the run)."""
    import random
    import threading

    base, base_name = long_server
    client = _client(base)
    for name, path in (("yes", "yes"), ("no", "no")):
        assert httpx.post(f"{base}/v1/adapters", json={"name": name, "path": path}).status_code == 200
    answer = {m: _chat(client, m, max_tokens=4).choices[0].message.content for m in (base_name, "yes", "no")}

    def timed_probe():
        start = time.perf_counter()
        _chat(client, base_name, max_tokens=4)
        return time.perf_counter() - start

    before = statistics.median(timed_probe() for _ in range(10))
    transient = [f"t{i}" for i in range(6)]  # loaded and deleted while requests run; each answers as "no"
    stop = threading.Event()

    def churn():
        rng = random.Random(0)
        while not stop.is_set():
            name = rng.choice(transient)
            if httpx.delete(f"{base}/v1/adapters/{name}").status_code == 404:
                httpx.post(f"{base}/v1/adapters", json={"name": name, "path": "no"})
            time.sleep(0.05)

    rng = random.Random(1)
    jobs = [(rng.choice([base_name, "yes", "no", *transient]), rng.random() < 0.2, rng.random() < 0.5)
            for _ in range(1000)]  # (model, streaming, drop the stream early)

    def one(job):
        model, streaming, drop = job
        expected = answer["no"] if model in transient else answer[model]
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
        try:
            if streaming and drop:
                with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True},
                                  timeout=120) as r:
                    if r.status_code == 404:
                        return "404" if model in transient else "unexpected 404"
                    next(line for line in r.iter_lines() if line.startswith("data:"))
                return "dropped"
            if streaming:
                text = "".join(c.choices[0].delta.content or "" for c in _chat(client, model, stream=True,
                                                                                max_tokens=4))
            else:
                text = _chat(client, model, max_tokens=4).choices[0].message.content
            return "ok" if text == expected else f"wrong answer for {model}: {text!r}"
        except openai.NotFoundError:
            return "404" if model in transient else "unexpected 404"

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            outcomes = list(pool.map(one, jobs))
    finally:
        stop.set()
        churner.join()
    counts = collections.Counter(outcomes)
    print(f"\nload test: {dict(counts)}")
    assert len(outcomes) == 1000 and set(counts) <= {"ok", "404", "dropped"}, counts
    after = [timed_probe() for _ in range(10)]
    assert max(after) < 3 * before, (after, before)
    assert httpx.get(f"{base}/health").status_code == 200


def test_a_tiny_temperature_samples_the_greedy_token_instead_of_failing():
    """softmax(logits / T) overflows fp32 for T ~ 1e-103 (the fuzz test's find: 500 'probability tensor contains
    inf'); the limit T -> 0 is greedy, which the sampler returns."""
    from lorakit.serve.sampling import Sampling

    logits = torch.tensor([1.0, 3.0, 2.0])
    assert all(Sampling(temperature=t).pick(logits, []) == 1 for t in (2e-103, 1e-300, 1e-7))
    torch.manual_seed(0)
    assert {Sampling(temperature=1.0).pick(logits, []) for _ in range(200)} == {0, 1, 2}


def test_top_p_seed_and_penalties_pick_as_defined():
    """top_p keeps the smallest set of tokens whose probability reaches p; a seed repeats the draws; penalties
    subtract presence + frequency x count from a repeated token's logit (OpenAI's definition)."""
    from lorakit.serve.sampling import Sampling, cut_at_stop

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    nucleus = {Sampling(temperature=1.0, top_p=0.7).pick(logits, []) for _ in range(300)}
    assert nucleus == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    seeded = Sampling.from_request({"temperature": 1.0, "seed": 7})
    again = Sampling.from_request({"temperature": 1.0, "seed": 7})
    assert [seeded.pick(logits, []) for _ in range(30)] == [again.pick(logits, []) for _ in range(30)]
    flat = torch.zeros(4)
    assert Sampling(presence_penalty=0.5, frequency_penalty=0.2).pick(flat, [0, 0, 1]) == 2  # 0, 1 pushed down
    assert cut_at_stop("Hello! How", ["!"], final=False) == ("Hello", True)
    assert cut_at_stop("Hello wor", ["world"], final=False) == ("Hello ", False)  # a possible stop is held back
    assert cut_at_stop("Hello wor", ["world"], final=True) == ("Hello wor", False)

def test_busy_port_is_refused_in_one_line_before_loading_and_docs_need_no_internet(server):
    """A second server on a busy port says so before loading the model or printing a URL; /docs (whose page
    would load assets from a CDN) is off, the OpenAPI schema stays."""
    base, _ = server
    port = base.rsplit(":", 1)[1]
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "lorakit", "serve", "--model=does-not-matter", f"--port={port}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "http://" not in proc.stdout and "Traceback" not in proc.stderr
    assert httpx.get(f"{base}/docs").status_code == 404 and httpx.get(f"{base}/openapi.json").status_code == 200
