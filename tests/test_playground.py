"""The browser playground in a real headless Chromium against a real `lorakit serve` (tiny model, two adapters,
one training run): no console errors, chat streams the API's answer, compare, unload, the runs view's curve,
labels and a narrow window. Screenshots go to $LORAKIT_SCREENSHOTS (the README's come from this test run) or
the test's temporary directory.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them when missing) and selenium (dev extras);
without them the tests skip, saying so."""

import json
import os
import shutil

import httpx
import pytest
from conftest import tiny_train_config
from test_serve import _start_server

import lorakit

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
HOW = ("browser tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
       "`make test` through .ci/run installs them) and selenium (pip install -e '.[dev]')")
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
    webdriver = pytest.importorskip("selenium.webdriver", reason=HOW)
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(HOW)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,900"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.get(server + "/")
    _wait(driver, lambda d: len(_options(d, "chat-model")) == 3)
    yield driver
    driver.quit()


@pytest.fixture
def shots(tmp_path):
    directory = os.environ.get("LORAKIT_SCREENSHOTS") or str(tmp_path)
    os.makedirs(directory, exist_ok=True)
    return lambda driver, name: driver.save_screenshot(os.path.join(directory, f"playground-{name}.png"))


def _wait(driver, condition, seconds=WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds).until(condition)


def _by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _options(driver, select_id):
    """The values a select offers, read in one script (the page re-renders lists while it refreshes them)."""
    return driver.execute_script(f"return [...document.querySelectorAll('#{select_id} option')].map(o => o.value)")


def _choose(driver, select_id, value):
    from selenium.webdriver.support.ui import Select

    Select(_by_id(driver, select_id)).select_by_value(value)


def _type(driver, element_id, text):
    field = _by_id(driver, element_id)
    field.clear()
    field.send_keys(text)


def _tab(driver, name):
    _by_id(driver, f"tab-{name}").click()
    _wait(driver, lambda d: _by_id(d, f"view-{name}").is_displayed())


def test_page_loads_with_no_console_errors_and_every_control_named(browser, server):
    assert _options(browser, "chat-model") == [os.path.basename(server_model(server)), "no", "yes"]
    unnamed = browser.execute_script("""
        return [...document.querySelectorAll('input, select, textarea, button')].filter(el =>
            !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
          .map(el => el.id || el.outerHTML);""")
    assert unnamed == []
    assert _by_id(browser, "chat-log").get_attribute("aria-live") == "polite"
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def server_model(server):
    return httpx.get(server + "/v1/models").json()["data"][0]["id"]


def test_chat_streams_the_answer_the_api_gives_for_the_same_request(browser, server, shots):
    _tab(browser, "chat")
    _choose(browser, "chat-model", "yes")
    _type(browser, "chat-max-tokens", "8")
    _type(browser, "chat-input", "Tell me something.")
    _by_id(browser, "chat-send").click()
    _wait(browser, lambda d: _css(d, "#chat-log li.assistant[data-done]"))
    shown = _css(browser, "#chat-log li.assistant .text")[-1].text
    api = httpx.post(server + "/v1/chat/completions", timeout=WAIT, json={
        "model": "yes", "messages": [{"role": "user", "content": "Tell me something."}], "max_tokens": 8,
        "temperature": 0}).json()["choices"][0]["message"]["content"]
    assert shown == api.strip() and "yes" in shown
    shots(browser, "chat")


def test_compare_streams_two_different_answers(browser, server, shots):
    _tab(browser, "compare")
    base = server_model(server)
    _choose(browser, "compare-left", base)
    _choose(browser, "compare-right", "yes")
    _type(browser, "compare-max-tokens", "8")
    _type(browser, "compare-input", "Tell me something.")
    _by_id(browser, "compare-send").click()
    _wait(browser, lambda d: len(_css(d, ".answer[data-done]")) == 2)
    left, right = _by_id(browser, "compare-left-answer").text, _by_id(browser, "compare-right-answer").text
    assert "yes" in right and left != right
    assert _by_id(browser, "compare-left-name").text == base and _by_id(browser, "compare-right-name").text == "yes"
    shots(browser, "compare")


def test_adapters_view_loads_refuses_and_unloads_as_the_api_does(browser, server, adapters, shots):
    _tab(browser, "adapters")
    _wait(browser, lambda d: len(_css(d, "#adapters-table tbody tr")) == 2)
    row = set(browser.execute_script(
        "return [...document.querySelectorAll('#adapters-table tr[data-adapter=\"yes\"] td')].map(t => t.textContent)"))
    assert {"yes", "LORA", "8", "16"} <= row
    _type(browser, "load-path", "../outside")  # refused by the server's root rule; the page shows its message
    _type(browser, "load-name", "bad")
    _by_id(browser, "load-button").click()
    _wait(browser, lambda d: _by_id(d, "error").is_displayed())
    expected = httpx.post(server + "/v1/adapters", json={"name": "bad", "path": "../outside"}).json()
    assert _by_id(browser, "error").text == expected["error"]["message"]
    _type(browser, "load-path", os.path.basename(adapters[1]))
    _type(browser, "load-name", "no2")
    _by_id(browser, "load-button").click()
    _wait(browser, lambda d: "no2" in _options(d, "chat-model"))
    shots(browser, "adapters")
    _css(browser, 'button[aria-label="Unload adapter no"]')[0].click()
    _wait(browser, lambda d: "no" not in _options(d, "chat-model"))
    for select in ("chat-model", "compare-left", "compare-right"):
        assert "no" not in _options(browser, select) and "no2" in _options(browser, select)
    assert browser.execute_script("return document.querySelector('#adapters-table tr[data-adapter=\"no\"]')") is None
    assert "no" not in [m["id"] for m in httpx.get(server + "/v1/models").json()["data"]]


def test_runs_view_draws_one_point_per_step_and_loads_the_run_adapter(browser, runs_dir, shots):
    records = [json.loads(line) for line in (runs_dir / "pref-run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    _tab(browser, "runs")
    _wait(browser, lambda d: _css(d, '#runs-list button[data-run="pref-run"]'))[0].click()
    line = _wait(browser, lambda d: _css(d, "#loss-chart polyline"))[0]
    assert len(line.get_attribute("points").split()) == len(steps) == 6
    assert len(_css(browser, "#loss-chart circle")) == len([r for r in records if "eval_loss" in r]) == 3
    assert len(_css(browser, "#reward-chart polyline")[0].get_attribute("points").split()) == 6  # DPO margins
    assert "finished: step 6" in _by_id(browser, "run-status").text
    shots(browser, "runs")
    _by_id(browser, "run-load").click()
    _wait(browser, lambda d: "pref-run" in _options(d, "chat-model") and _by_id(d, "view-chat").is_displayed())
    assert _by_id(browser, "chat-model").get_attribute("value") == "pref-run"


def test_narrow_window_has_no_sideways_scrolling(browser):
    browser.set_window_size(400, 800)
    try:
        for view in ("chat", "compare", "adapters", "runs"):
            _tab(browser, view)
            assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"), view
    finally:
        browser.set_window_size(1200, 900)


def test_a_run_still_training_updates_live(browser, runs_dir):
    live = runs_dir / "live-run"
    live.mkdir()
    (live / "config.yaml").write_text("method: sft\nmax_steps: 10\n")
    records = [{"step": s, "train_loss": 3.0 - 0.1 * s} for s in (1, 2)]
    (live / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _tab(browser, "chat")
    _tab(browser, "runs")  # the list is read again when the view opens
    _wait(browser, lambda d: _css(d, '#runs-list button[data-run="live-run"]'))[0].click()
    _wait(browser, lambda d: "training: step 2 of 10" in _by_id(d, "run-status").text)
    with open(live / "metrics.jsonl", "a") as f:  # the run logs its next step
        f.write(json.dumps({"step": 3, "train_loss": 2.7}) + "\n")
    _wait(browser, lambda d: "training: step 3 of 10" in _by_id(d, "run-status").text, seconds=10)
    points = _by_id(browser, "loss-chart").find_element("css selector", "polyline").get_attribute("points")
    assert len(points.split()) == 3
