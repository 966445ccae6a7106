"""The browser playground in a real headless Chromium against a real `lorakit serve` (tiny model, two adapters,
one training run): no console errors, chat streams the API's answer, compare, unload, the runs view's curve,
labels and a narrow window. Screenshots go to $LORAKIT_SCREENSHOTS (the docs' come from docs/make_screenshots.py) or
the test's temporary directory.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them when missing) and selenium (dev extras);
without them the tests skip, saying so."""

import json
import os
import re

import httpx
import pytest
from browser import by_id, choose, chrome_or_skip, console_errors, css, open_tab, options, type_into
from browser import wait as browser_wait
from conftest import tiny_train_config
from test_serve import _start_server

import lorakit

DEMO_PAIRS = os.path.join(os.path.dirname(lorakit.__file__), "data", "demo_preferences.jsonl")
WAIT = 60  # seconds for an answer of a few tokens on a loaded 2-core machine


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, serve_model_dir, tiny_tokenizer):
    """One real DPO training run of the tiny model (metrics.jsonl with train and eval records, config, adapter)."""
    from transformers import AutoModelForCausalLM

    from lorakit.train import train

    runs = tmp_path_factory.mktemp("runs")
    train(tiny_train_config(runs / "pref-run", method="dpo", data=DEMO_PAIRS, max_steps=6, eval_every=3),
          AutoModelForCausalLM.from_pretrained(serve_model_dir), tiny_tokenizer)
    prompts = runs / "prompts.jsonl"  # and one GRPO run: its reward is charted instead of a margin
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?"}) + "\n" for i in range(8)))
    train(tiny_train_config(runs / "grpo-run", method="grpo", data=str(prompts), eval_data=str(prompts),
                            rewards=[{"name": "length_target", "target": 3}], num_generations=4, batch_size=8,
                            max_completion_length=6, max_steps=4, eval_every=2, temperature=1.5),
          AutoModelForCausalLM.from_pretrained(serve_model_dir), tiny_tokenizer)
    (runs / "prompts.jsonl").unlink()
    return runs


@pytest.fixture(scope="module")
def server(serve_model_dir, adapters, runs_dir):
    yes, no = adapters
    proc, base = _start_server(serve_model_dir, f"--adapter=yes={yes}", f"--adapter=no={no}",
                               f"--adapter-root={os.path.dirname(yes)}", f"--runs={runs_dir}",
                               "--max-tokens-cap=64")
    yield base
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def browser(server):
    driver = chrome_or_skip()
    driver.get(server + "/")
    _wait(driver, lambda d: len(options(d, "chat-model")) == 3)
    yield driver
    driver.quit()


def _wait(driver, condition):
    return browser_wait(driver, condition, WAIT)


@pytest.fixture
def shots(tmp_path):
    directory = os.environ.get("LORAKIT_SCREENSHOTS") or str(tmp_path)
    os.makedirs(directory, exist_ok=True)
    return lambda driver, name: driver.save_screenshot(os.path.join(directory, f"playground-{name}.png"))


def test_page_loads_with_no_console_errors_and_every_control_named(browser, server):
    assert options(browser, "chat-model") == [os.path.basename(server_model(server)), "no", "yes"]
    unnamed = browser.execute_script("""
        return [...document.querySelectorAll('input, select, textarea, button')].filter(el =>
            !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
          .map(el => el.id || el.outerHTML);""")
    assert unnamed == []
    assert by_id(browser, "chat-log").get_attribute("aria-live") == "polite"
    assert console_errors(browser) == []


def server_model(server):
    return httpx.get(server + "/v1/models").json()["data"][0]["id"]


def test_chat_streams_the_answer_the_api_gives_for_the_same_request(browser, server, shots):
    open_tab(browser, "chat")
    choose(browser, "chat-model", "yes")
    type_into(browser, "chat-max-tokens", "8")
    type_into(browser, "chat-input", "Tell me something.")
    by_id(browser, "chat-send").click()
    _wait(browser, lambda d: css(d, "#chat-log li.assistant[data-done]"))
    shown = css(browser, "#chat-log li.assistant .text")[-1].text
    api = httpx.post(server + "/v1/chat/completions", timeout=WAIT, json={
        "model": "yes", "messages": [{"role": "user", "content": "Tell me something."}], "max_tokens": 8,
        "temperature": 0}).json()["choices"][0]["message"]["content"]
    assert shown == api.strip() and "yes" in shown
    shots(browser, "chat")


def test_compare_streams_two_different_answers(browser, server, shots):
    open_tab(browser, "compare")
    base = server_model(server)
    choose(browser, "compare-left", base)
    choose(browser, "compare-right", "yes")
    type_into(browser, "compare-max-tokens", "8")
    type_into(browser, "compare-input", "Tell me something.")
    before = _decode_steps(server)
    by_id(browser, "compare-send").click()
    _wait(browser, lambda d: len(css(d, ".answer[data-done]")) == 2)
    steps, shared = (a - b for a, b in zip(_decode_steps(server), before))
    left, right = by_id(browser, "compare-left-answer").text, by_id(browser, "compare-right-answer").text
    assert "yes" in right and left != right
    tokens = [httpx.post(f"{server}/v1/chat/completions", json={
        "model": m, "messages": [{"role": "user", "content": "Tell me something."}], "max_tokens": 8,
        "temperature": 0}).json()["usage"]["completion_tokens"] for m in (base, "yes")]
    assert min(tokens) >= 3 and shared >= min(tokens) - 2, (steps, shared, tokens)  # both sides in one batch
    assert by_id(browser, "compare-left-name").text == base and by_id(browser, "compare-right-name").text == "yes"
    shots(browser, "compare")


def _decode_steps(server) -> tuple[float, float]:
    """(decoding steps, steps that decoded two rows or more) so far, from the server's /metrics."""
    text = httpx.get(f"{server}/metrics").text

    def sample(name):
        return float(re.search(rf"^lorakit:decode_batch_rows{re.escape(name)} (\S+)$", text, re.M).group(1))
    return sample("_count"), sample("_count") - sample('_bucket{le="1"}')


def test_adapters_view_loads_refuses_and_unloads_as_the_api_does(browser, server, adapters, shots):
    open_tab(browser, "adapters")
    _wait(browser, lambda d: len(css(d, "#adapters-table tbody tr")) == 2)
    row = set(browser.execute_script(
        "return [...document.querySelectorAll('#adapters-table tr[data-adapter=\"yes\"] td')].map(t => t.textContent)"))
    assert {"yes", "LORA", "8", "16"} <= row
    type_into(browser, "load-path", "../outside")  # refused by the server's root rule; the page shows its message
    type_into(browser, "load-name", "bad")
    by_id(browser, "load-button").click()
    _wait(browser, lambda d: by_id(d, "error").is_displayed())
    expected = httpx.post(server + "/v1/adapters", json={"name": "bad", "path": "../outside"}).json()
    assert by_id(browser, "error").text == expected["error"]["message"]
    type_into(browser, "load-path", os.path.basename(adapters[1]))
    type_into(browser, "load-name", "no2")
    by_id(browser, "load-button").click()
    _wait(browser, lambda d: "no2" in options(d, "chat-model"))
    shots(browser, "adapters")
    css(browser, 'button[aria-label="Unload adapter no"]')[0].click()
    _wait(browser, lambda d: "no" not in options(d, "chat-model"))
    for select in ("chat-model", "compare-left", "compare-right"):
        assert "no" not in options(browser, select) and "no2" in options(browser, select)
    assert browser.execute_script("return document.querySelector('#adapters-table tr[data-adapter=\"no\"]')") is None
    assert "no" not in [m["id"] for m in httpx.get(server + "/v1/models").json()["data"]]


def test_runs_view_draws_one_point_per_step_and_loads_the_run_adapter(browser, runs_dir, shots):
    records = [json.loads(line) for line in (runs_dir / "pref-run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    open_tab(browser, "runs")
    _wait(browser, lambda d: css(d, '#runs-list button[data-run="pref-run"]'))[0].click()
    line = _wait(browser, lambda d: css(d, "#loss-chart polyline"))[0]
    assert len(line.get_attribute("points").split()) == len(steps) == 6
    assert len(css(browser, "#loss-chart circle")) == len([r for r in records if "eval_loss" in r]) == 3
    assert len(css(browser, "#reward-chart polyline")[0].get_attribute("points").split()) == 6  # DPO margins
    assert "finished: step 6" in by_id(browser, "run-status").text
    shots(browser, "runs")
    by_id(browser, "run-load").click()
    _wait(browser, lambda d: "pref-run" in options(d, "chat-model") and by_id(d, "view-chat").is_displayed())
    assert by_id(browser, "chat-model").get_attribute("value") == "pref-run"


def test_runs_view_charts_a_grpo_runs_reward(browser, runs_dir):
    records = [json.loads(line) for line in (runs_dir / "grpo-run" / "metrics.jsonl").read_text().splitlines()]
    from selenium.common.exceptions import StaleElementReferenceException

    def shown(driver):  # the page re-renders the list and chart as it refreshes: read them in one script
        try:
            for button in css(driver, '#runs-list button[data-run="grpo-run"]'):
                if button.get_attribute("aria-current") != "true":
                    button.click()
        except StaleElementReferenceException:
            return None
        return driver.execute_script("""
            const fig = document.getElementById('reward-figure'), line = document.querySelector('#reward-chart polyline');
            if (fig.hidden || !line || !document.getElementById('run-status').textContent.includes('grpo')) return null;
            return {label: document.getElementById('reward-chart').getAttribute('aria-label'),
                    points: line.getAttribute('points').trim().split(/\\s+/).length,
                    dots: document.querySelectorAll('#reward-chart circle').length,
                    caption: document.getElementById('reward-caption').textContent};""")

    open_tab(browser, "runs")
    chart = _wait(browser, shown)
    assert chart["label"] == "Reward against step"
    assert chart["points"] == len([r for r in records if "reward" in r]) == 4
    assert chart["dots"] == len([r for r in records if "eval_reward" in r]) == 3
    assert chart["caption"].startswith("Reward: sampled rollouts")


def test_narrow_window_has_no_sideways_scrolling(browser):
    browser.set_window_size(400, 800)
    try:
        for view in ("chat", "compare", "adapters", "runs"):
            open_tab(browser, view)
            assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"), view
    finally:
        browser.set_window_size(1200, 900)


def test_a_run_still_training_updates_live(browser, runs_dir):
    live = runs_dir / "live-run"
    live.mkdir()
    (live / "config.yaml").write_text("method: sft\nmax_steps: 10\n")
    records = [{"step": s, "train_loss": 3.0 - 0.1 * s} for s in (1, 2)]
    (live / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    open_tab(browser, "chat")
    open_tab(browser, "runs")  # the list is read again when the view opens
    _wait(browser, lambda d: css(d, '#runs-list button[data-run="live-run"]'))[0].click()
    _wait(browser, lambda d: "training: step 2 of 10" in by_id(d, "run-status").text)
    with open(live / "metrics.jsonl", "a") as f:  # the run logs its next step
        f.write(json.dumps({"step": 3, "train_loss": 2.7}) + "\n")
    browser_wait(browser, lambda d: "training: step 3 of 10" in by_id(d, "run-status").text, 10)
    points = by_id(browser, "loss-chart").find_element("css selector", "polyline").get_attribute("points")
    assert len(points.split()) == 3
