"""The playground's Train view against a real `lorakit serve --allow-training` (a small random Llama whose steps take
long enough to watch): headless Chromium drives it through accessible labels only (upload, preview, start, the
live curve, stop, resume, the adapter in Compare); the config downloaded from the page replays the run bit for bit
with `lorakit train`; and the security rules: 403 without --allow-training, 413 over the upload limit, 400 for
paths outside the roots (.. and symlinks), one clear error for a bad data file with no run started.

Browser parts need Debian's chromium and chromium-driver and selenium (they skip, saying so, without them)."""

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from browser import chrome_or_skip, console_errors
from browser import wait as browser_wait
from test_serve import _start_server

from lorakit.train.config import DEMO_DATA

WAIT = 120  # seconds: a run of the small model on a loaded 2-core machine, or its process start


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory, tiny_tokenizer):
    """A random Llama big enough that one training step takes a visible fraction of a second."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("train-view-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tiny_tokenizer.pad_token_id,
                         eos_token_id=tiny_tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def chat_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("upload") / "support.jsonl"
    with open(DEMO_DATA) as f:
        path.write_text("".join(f.readlines()[:24]))
    return path


@pytest.fixture(scope="module")
def training_server(small_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-view")
    outside = root / "outside.jsonl"
    outside.write_text(open(DEMO_DATA).readline())
    (root / "data").mkdir()
    os.symlink(outside, root / "data" / "escape.jsonl")  # a link out of the data root
    proc, base = _start_server(small_model_dir, "--allow-training", f"--runs={root / 'runs'}",
                               f"--data-root={root / 'data'}", "--max-upload-mb=0.05", "--max-tokens-cap=16",
                               "--dtype=fp32")
    yield base, root
    proc.terminate()
    proc.wait(60)


@pytest.fixture(scope="module")
def browser(training_server):
    driver = chrome_or_skip(1300, 1000)
    driver.get(training_server[0] + "/")
    yield driver
    driver.quit()


def _wait(driver, condition, seconds=WAIT):
    return browser_wait(driver, condition, seconds)


# --- accessible names only ---------------------------------------------------------------------------------
def control(scope, label):
    """The input/select/textarea whose <label> (around it, or naming it with for=) starts with `label`, inside
    `scope` (the driver or a view)."""
    from selenium.webdriver.common.by import By

    name = scope.find_element(By.XPATH, f".//label[starts-with(normalize-space(.), {json.dumps(label)})]")
    target = name.get_attribute("for")
    if target:
        return scope.find_element(By.ID, target)
    return name.find_element(By.XPATH, ".//*[self::input or self::select or self::textarea]")


def button(scope, name):
    from selenium.webdriver.common.by import By

    return scope.find_element(By.XPATH, f".//*[self::button or self::a][normalize-space(.)={json.dumps(name)}]")


def labelled(scope, name):
    """The element whose aria-label is `name`, or the region / tab named so."""
    from selenium.webdriver.common.by import By

    return scope.find_element(By.XPATH, f".//*[@aria-label={json.dumps(name)}] | .//*[@role='tab'][.={json.dumps(name)}]")


def view(driver, name):
    from selenium.webdriver.common.by import By

    labelled(driver, name).click()
    panel = driver.find_element(By.XPATH, f"//*[@role='tabpanel'][@aria-labelledby=//*[@role='tab'][.={json.dumps(name)}]/@id]")
    _wait(driver, lambda d: panel.is_displayed())
    return panel


def set_value(field, value):
    from selenium.webdriver.support.ui import Select

    if field.tag_name == "select":
        Select(field).select_by_value(value)
    else:
        field.clear()
        field.send_keys(value)


def alert_text(driver) -> str:
    from selenium.webdriver.common.by import By

    shown = [e.text for e in driver.find_elements(By.XPATH, "//*[@role='alert']") if e.is_displayed()]
    return " ".join(shown)


def train_points(driver) -> int:
    """Train points on the chart labelled "Live loss against step" (read in one script: the page redraws it)."""
    return int(driver.execute_script(
        "const line = document.querySelector('svg[aria-label=\"Live loss against step\"] polyline');"
        "return line ? line.dataset.points : 0;"))


def progress(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.XPATH, "//*[@role='status']").text


# --- the browser run ---------------------------------------------------------------------------------------------
def _train_records(path):
    with open(path) as f:
        return [r for r in map(json.loads, f) if "train_loss" in r]


def test_upload_preview_start_watch_stop_resume_and_compare_in_the_browser(browser, training_server, chat_rows,
                                                                            tmp_path):
    base, root = training_server
    train = view(browser, "Train")
    control(train, "Upload a data file").send_keys(str(chat_rows))
    _wait(browser, lambda d: control(train, "Data file").get_attribute("value") == "uploads/support.jsonl")
    for label, value in (("Run name", "browser-run"), ("Steps", "6"), ("Rank", "4"), ("Alpha", "8"),
                         ("Learning rate", "0.005"), ("Batch size", "8"), ("Max length", "128"),
                         ("Precision", "fp32")):
        set_value(control(train, label), value)
    settings = {"data": "uploads/support.jsonl", "max_steps": 6, "r": 4, "lora_alpha": 8, "lr": 0.005,
                "batch_size": 8, "max_length": 128, "bf16": False}
    # the preview: the first rows as the trainer sees them, prompt masked and answer trained, as the API says
    expected = httpx.post(f"{base}/v1/train/preview", json={"settings": settings}, timeout=60).json()
    def shown_preview(d):
        rows = labelled(train, "Data preview").find_elements("css selector", "li")
        return [("".join(e.get_attribute("textContent") for e in row.find_elements("css selector", ".masked")),
                 "".join(e.get_attribute("textContent") for e in row.find_elements("css selector", "mark")))
                for row in rows]
    wanted = [("".join(p["text"] for p in pieces if not p["trained"]), "".join(p["text"] for p in pieces if p["trained"]))
              for pieces in expected["rows"]]
    _wait(browser, lambda d: shown_preview(d) == wanted)  # the page previews with the settings just typed
    assert len(wanted) == 3 and all("<|im_start|>user" in masked and "Brightwater" in trained
                                    for masked, trained in wanted)
    estimate = httpx.post(f"{base}/v1/train/estimate", json={"settings": settings}, timeout=60).json()
    _wait(browser, lambda d: labelled(train, "Trainable parameters").text
          == f"{estimate['trainable_parameters']:,}")

    button(train, "Start").click()
    seen = []  # the curve's train points each time they changed
    def watch(d):
        points = train_points(d)
        if not seen or seen[-1] != points:
            seen.append(points)
        return points >= 2
    _wait(browser, watch)
    button(train, "Stop").click()
    _wait(browser, lambda d: progress(d).startswith("stopped"))
    run_dir = root / "runs" / "browser-run"
    stopped_at = len(_train_records(run_dir / "metrics.jsonl"))
    assert 2 <= stopped_at < 6 and (run_dir / "checkpoint.pt").is_file(), progress(browser)
    assert train_points(browser) == stopped_at

    button(train, "Resume").click()
    def watch_to_end(d):
        watch(d)
        return progress(d).startswith("finished")
    _wait(browser, watch_to_end)
    records = _train_records(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    _wait(browser, lambda d: train_points(d) == 6)
    growth = [p for p in seen if p > 0]
    assert growth == sorted(growth) and len(set(growth)) >= 3, seen  # point by point, not all at the end
    assert "Brightwater" not in alert_text(browser)

    # the config the page offers replays the same losses with `lorakit train`, bit for bit
    link = button(train, "Download config (YAML)").get_attribute("href")
    config = tmp_path / "browser-run.yaml"
    config.write_bytes(httpx.get(link, timeout=30).content)
    replay = subprocess.run([sys.executable, "-m", "lorakit", "train", str(config), "--quiet",
                             f"--output_dir={tmp_path / 'replay'}"], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert replay.returncode == 0, replay.stdout[-2000:] + replay.stderr[-2000:]
    replayed = _train_records(tmp_path / "replay" / "metrics.jsonl")
    assert [r["train_loss"] for r in replayed] == [r["train_loss"] for r in records]

    # the finished adapter: loaded into the server, compared with the base on a held-out prompt
    compare = view(browser, "Compare")
    set_value(control(compare, "Max tokens"), "12")
    view(browser, "Train")
    button(train, "Try the adapter in Compare").click()
    _wait(browser, lambda d: compare.is_displayed() and all(
        labelled(compare, f"{side} answer").find_element("css selector", ".answer").get_attribute("data-done")
        for side in ("Left", "Right")))
    prompt = control(compare, "Prompt").get_attribute("value")
    assert prompt and prompt in expected["heldout_prompts"]
    for side, model in (("Left", httpx.get(f"{base}/v1/adapters").json()["base"]), ("Right", "browser-run")):
        answer = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 12}).json()
        shown = labelled(compare, f"{side} answer").find_element("css selector", ".answer").text
        assert shown == answer["choices"][0]["message"]["content"].strip(), side
    assert not console_errors(browser)


def test_a_bad_data_file_shows_one_clear_error_and_starts_no_run(browser, training_server, tmp_path):
    base, root = training_server
    before = sorted(os.listdir(root / "runs"))
    bad = {"not-json.jsonl": "this is not JSON\n", "no-columns.jsonl": '{"question": "hi", "reply": "yo"}\n',
           "empty.jsonl": ""}
    says = {"not-json.jsonl": "invalid JSON", "no-columns.jsonl": "none of the known fields",
            "empty.jsonl": "empty"}
    train = view(browser, "Train")
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        control(train, "Upload a data file").send_keys(str(tmp_path / name))
        if name == "empty.jsonl":  # refused at upload
            _wait(browser, lambda d: says[name] in alert_text(d))
            continue
        _wait(browser, lambda d: control(train, "Data file").get_attribute("value") == f"uploads/{name}")
        _wait(browser, lambda d: says[name] in alert_text(d))
        set_value(control(train, "Run name"), f"bad-{name.split('.')[0]}")
        button(train, "Start").click()
        _wait(browser, lambda d: says[name] in alert_text(d) and "cannot be trained on" in alert_text(d))
        assert alert_text(browser).count(says[name]) == 1  # one error, not one per row
    assert sorted(os.listdir(root / "runs")) == before


# --- security -------------------------------------------------------------------------------------------------------
def test_training_routes_answer_403_without_allow_training(serve_model_dir):
    proc, base = _start_server(serve_model_dir)
    try:
        calls = [("GET", "/v1/train"), ("POST", "/v1/train/uploads?filename=a.jsonl"), ("POST", "/v1/train/preview"),
                 ("POST", "/v1/train/estimate"), ("POST", "/v1/train/runs"), ("GET", "/v1/train/runs/x"),
                 ("GET", "/v1/train/runs/x/events"), ("GET", "/v1/train/runs/x/config.yaml"),
                 ("POST", "/v1/train/runs/x/stop"), ("POST", "/v1/train/runs/x/resume")]
        for method, path in calls:
            r = httpx.request(method, base + path, json={}, timeout=30)
            assert r.status_code == 403 and "--allow-training" in r.json()["error"]["message"], (method, path)
    finally:
        proc.terminate()
        proc.wait(30)


def test_upload_over_the_limit_is_413_and_nothing_is_kept(training_server):
    base, root = training_server
    big = b'{"text": "' + b"x" * 60_000 + b'"}\n'  # the server allows 0.05 MiB
    r = httpx.post(f"{base}/v1/train/uploads", params={"filename": "big.jsonl"}, content=big, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    chunks = (big[i:i + 8192] for i in range(0, len(big), 8192))  # no Content-Length: counted as it arrives
    r = httpx.post(f"{base}/v1/train/uploads", params={"filename": "big.jsonl"}, content=chunks, timeout=30)
    assert r.status_code == 413
    assert not os.path.exists(root / "data" / "uploads" / "big.jsonl")


@pytest.mark.parametrize("path, why", [("../outside.jsonl", "'..'"), ("/etc/passwd", "absolute"),
                                       ("escape.jsonl", "symlink")])
def test_a_data_path_outside_the_root_is_400_with_the_reason(training_server, path, why):
    base, _ = training_server
    for route in ("/v1/train/preview", "/v1/train/runs"):
        r = httpx.post(base + route, json={"name": "outside", "settings": {"data": path}}, timeout=30)
        assert r.status_code == 400, (route, r.text)
        message = r.json()["error"]["message"]
        assert path in message and why in message, message
    for name in ("../escape", "a/b", ".hidden"):
        r = httpx.post(f"{base}/v1/train/runs", json={"name": name, "settings": {"data": "escape.jsonl"}}, timeout=30)
        assert r.status_code == 400 and "run name" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/v1/train/uploads", params={"filename": "../x.jsonl"}, content=b"{}", timeout=30)
    assert r.status_code == 400


def test_a_restarted_server_shows_the_run_it_was_training_as_interrupted_and_resumable(small_model_dir, chat_rows,
                                                                                        tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    data.mkdir()
    (data / "rows.jsonl").write_bytes(chat_rows.read_bytes())
    args = ("--allow-training", f"--runs={runs}", f"--data-root={data}", "--dtype=fp32")
    proc, base = _start_server(small_model_dir, *args)
    try:
        settings = {"data": "rows.jsonl", "max_steps": 40, "batch_size": 8, "max_length": 128, "bf16": False}
        assert httpx.post(f"{base}/v1/train/runs", json={"name": "long", "settings": settings},
                          timeout=60).status_code == 200
        deadline = time.time() + WAIT
        while time.time() < deadline and len(_train_records_if_any(runs / "long" / "metrics.jsonl")) < 2:
            time.sleep(0.2)
        proc.kill()  # no goodbye: the child is told by the kernel (SIGINT) and checkpoints
        proc.wait(30)
    finally:
        proc.kill()
    proc, base = _start_server(small_model_dir, *args)
    try:
        deadline = time.time() + WAIT
        while time.time() < deadline:
            state = httpx.get(f"{base}/v1/train/runs/long", timeout=30).json()
            if state["status"] == "interrupted":
                break
            time.sleep(0.3)
        assert state["status"] == "interrupted" and state["resumable"], state
        listed = httpx.get(f"{base}/v1/train", timeout=30).json()["runs"]
        assert [(r["id"], r["status"]) for r in listed] == [("long", "interrupted")]
    finally:
        proc.terminate()
        proc.wait(60)


def _train_records_if_any(path):
    return _train_records(path) if os.path.isfile(path) else []


def test_the_page_sets_only_what_it_offers_and_grpo_only_built_in_rewards(tmp_path, serve_model_dir):
    from lorakit.studio.settings import train_config

    (tmp_path / "rows.jsonl").write_text('{"prompt": "What is 2 + 2?", "answer": "4"}\n')
    cfg = train_config({"data": "rows.jsonl", "method": "grpo", "rewards": ["exact_answer"], "variant": "dora",
                        "r": 4}, serve_model_dir, str(tmp_path), str(tmp_path / "runs" / "g"))
    assert cfg.rewards == ["exact_answer"] and cfg.lora["use_dora"] and cfg.lora["r"] == 4
    assert cfg.model == os.path.abspath(serve_model_dir) and cfg.output_dir == str(tmp_path / "runs" / "g")
    for bad, says in (({"rewards": ["os:system"]}, "built-in reward names"), ({"model": "other"}, "unknown setting"),
                      ({"output_dir": "/tmp"}, "unknown setting"), ({"variant": "lokr"}, "variant"),
                      ({"bf16": "yes"}, "bf16")):
        with pytest.raises(ValueError, match=says):
            train_config({"data": "rows.jsonl", "method": "grpo", **bad}, serve_model_dir, str(tmp_path),
                         str(tmp_path / "runs" / "g"))
