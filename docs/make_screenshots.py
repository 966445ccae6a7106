"""Regenerate the playground screenshots in docs/playground/ from the embedded SmolLM2-135M-Instruct model and the
demo adapter (the Brightwater house style), with the demo's real training run in the runs view, and the Train view
during a short run started from the page on the demo data.

    python docs/make_screenshots.py            # trains the demo first when runs/demo/adapter is missing
    python docs/make_screenshots.py --train    # retrain the demo, then take the pictures

Needs Debian's `chromium` and `chromium-driver` and selenium (the dev extras). The answers shown are printed, and the
script stops with an error when the base and the adapter give the same answer (the pictures would show nothing)."""

import argparse
import os
import socket
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from browser import by_id, choose, console_errors, css, open_tab, options, start_chrome, type_into, wait  # noqa: E402

QUESTION = "How can I stay warm at night when camping?"  # one of the demo's held-out prompts (src/lorakit/data/demo_prompts.txt)
MAX_TOKENS = 128
WAIT_S = 300  # a 96-token answer on a loaded 2-core CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(runs: str, adapter: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", f"--adapter=demo={adapter}", f"--runs={runs}",
                             f"--adapter-root={runs}", f"--port={port}", f"--max-tokens-cap={MAX_TOKENS}",
                             "--allow-training", f"--data-root={os.path.join(runs, 'screenshot-data')}"], cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"lorakit serve exited with status {proc.returncode}")
        try:
            if httpx.get(base + "/health").status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.25)
    proc.kill()
    raise SystemExit("lorakit serve did not answer /health within 5 minutes")


def take_screenshots(base: str, out: str) -> dict[str, str]:
    """Chat, compare, adapters and runs views as docs/playground/playground-<view>.png; returns the answers shown."""
    driver = start_chrome(1200, 900)
    shot = lambda name: driver.save_screenshot(os.path.join(out, f"playground-{name}.png"))  # noqa: E731
    try:
        driver.get(base + "/")
        wait(driver, lambda d: "demo" in options(d, "chat-model"), WAIT_S)
        base_model = options(driver, "chat-model")[0]

        open_tab(driver, "chat")
        choose(driver, "chat-model", "demo")
        type_into(driver, "chat-max-tokens", str(MAX_TOKENS))
        type_into(driver, "chat-input", QUESTION)
        by_id(driver, "chat-send").click()
        wait(driver, lambda d: css(d, "#chat-log li.assistant[data-done]"), WAIT_S)
        chat = css(driver, "#chat-log li.assistant .text")[-1].text
        shot("chat")

        open_tab(driver, "compare")
        choose(driver, "compare-left", base_model)
        choose(driver, "compare-right", "demo")
        type_into(driver, "compare-max-tokens", str(MAX_TOKENS))
        type_into(driver, "compare-input", QUESTION)
        by_id(driver, "compare-send").click()
        wait(driver, lambda d: len(css(d, ".answer[data-done]")) == 2, WAIT_S)
        left, right = by_id(driver, "compare-left-answer").text, by_id(driver, "compare-right-answer").text
        shot("compare")

        open_tab(driver, "adapters")
        wait(driver, lambda d: css(d, '#adapters-table tr[data-adapter="demo"]'), WAIT_S)
        shot("adapters")

        open_tab(driver, "runs")
        wait(driver, lambda d: css(d, '#runs-list button[data-run="demo"]'), WAIT_S)[0].click()
        wait(driver, lambda d: css(d, "#loss-chart polyline"), WAIT_S)
        shot("runs")
        take_train_screenshot(driver, shot)
        errors = console_errors(driver)
    finally:
        driver.quit()
    if errors:
        raise SystemExit(f"the playground logged console errors: {errors}")
    if left == right:
        raise SystemExit(f"base and demo adapter gave the same answer, the pictures would show no difference: {left!r}")
    return {"chat (demo)": chat, f"compare left ({base_model})": left, "compare right (demo)": right}


def take_train_screenshot(driver, shot) -> None:
    """The Train view: the demo data uploaded, previewed and estimated, then a 12-step run followed to its end."""
    from lorakit.train.config import DEMO_DATA

    open_tab(driver, "train")
    by_id(driver, "train-upload").send_keys(DEMO_DATA)
    wait(driver, lambda d: by_id(d, "train-data").get_attribute("value").endswith(os.path.basename(DEMO_DATA)), WAIT_S)
    for field, value in (("train-name", f"browser-{int(time.time())}"), ("train-steps", "12"), ("train-batch", "4"),
                         ("train-max-length", "256")):
        type_into(driver, field, value)
    wait(driver, lambda d: by_id(d, "estimate-parameters").text != "-", WAIT_S)
    by_id(driver, "train-probe").click()  # 3 measured steps: seconds per step and peak memory
    wait(driver, lambda d: "tokens/s" in by_id(d, "estimate-step").text, WAIT_S)
    by_id(driver, "train-start").click()
    wait(driver, lambda d: by_id(d, "train-progress").get_attribute("data-status") == "finished", 3 * WAIT_S)
    driver.set_window_size(1200, 1900)  # the whole view: settings, preview, estimate, the run's curve and log
    shot("train")
    driver.set_window_size(1200, 900)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true", help="retrain the demo adapter first")
    parser.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="runs directory holding demo/")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "playground"), help="where the PNGs go")
    args = parser.parse_args()
    adapter = os.path.join(args.runs, "demo", "adapter")
    if args.train or not os.path.exists(os.path.join(adapter, "adapter_model.safetensors")):
        subprocess.run([sys.executable, "-m", "lorakit", "train", "--force",
                        f"--output_dir={os.path.join(args.runs, 'demo')}"], cwd=ROOT, check=True)
    os.makedirs(args.out, exist_ok=True)
    proc, base = _start_server(args.runs, adapter)
    try:
        answers = take_screenshots(base, args.out)
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"question: {QUESTION}")
    for where, text in answers.items():
        print(f"{where}: {text}")
    print(f"screenshots written to {args.out}")


if __name__ == "__main__":
    main()
