"""The code blocks of the README and the docs pages, and a runner that executes a page's runnable blocks in order.

A Python or shell block says what it is with an HTML comment on the line above its fence (invisible on the site):
  <!-- test: run -->               run it; the embedded model's name is replaced by a tiny model's directory
  <!-- test: integration -->       run it as written, on the embedded SmolLM2-135M (an `integration` test; a page's
                                    integration blocks run in their own pass, without its `run` blocks)
  <!-- test: background -->        a shell command that keeps running (a server): started, then its
                                    `--port N` is polled at /health before the next block; stopped at the end
  <!-- test: skip (reason) -->     not run, for the reason given
A page may start its run with `<!-- test-setup: demo-adapter -->`: a short training run writes `runs/demo/adapter`
(on the tiny model, or the embedded one for integration pages) before its first block.
Python blocks of one page share one namespace, as in a tutorial read top to bottom. A shell block's commands run
one by one (`run_shell`): no shell state (`cd`, variables) carries from one command line to the next. In `console` blocks only the
lines after `$ ` (and their `\\` continuations) are commands; the rest is output shown on the page.

    python tests/docs_blocks.py PAGE.md --workdir DIR [--tiny-model DIR]    # what tests/test_docs.py runs
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request

RUNNABLE_LANGUAGES = ("python", "bash", "console", "sh", "shell")
MARKER = re.compile(r"<!--\s*test:\s*(run|integration|background|skip)\b\s*(.*?)\s*-->")
SETUP = re.compile(r"<!--\s*test-setup:\s*([\w-]+)\s*-->")
FENCE = re.compile(r"^(\s*)```(\w*)")
EMBEDDED_NAMES = re.compile(r"(?<![\w/.-])(smollm2-135m|HuggingFaceTB/SmolLM2-135M-Instruct)(?![\w/-])")
BLOCK_TIMEOUT_S = 600


@dataclasses.dataclass
class Block:
    page: str
    line: int           # 1-based line of the opening fence
    language: str
    code: str
    mode: str | None    # run / integration / background / skip, None when unmarked
    reason: str = ""


def page_blocks(path: str) -> list[Block]:
    """Every fenced block of a Markdown file with its language and the marker above it."""
    lines = open(path, encoding="utf-8").read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, indent = i, fence.group(1)
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        marker = MARKER.search(lines[start - 1]) if start > 0 else None
        blocks.append(Block(path, start + 1, fence.group(2), "\n".join(body) + "\n",
                            marker.group(1) if marker else None, marker.group(2) if marker else ""))
        i += 1
    return blocks


def page_setups(path: str) -> list[str]:
    return SETUP.findall(open(path, encoding="utf-8").read())


def console_commands(code: str) -> str:
    """The commands of a `console` block: `$ ` lines and their continuation lines."""
    commands, continuing = [], False
    for line in code.splitlines():
        if line.startswith("$ ") or continuing:
            commands.append(line[2:] if line.startswith("$ ") else line)
            continuing = line.rstrip().endswith("\\")
    return "\n".join(commands) + "\n"


def _substituted(code: str, tiny_model: str | None) -> str:
    return code if tiny_model is None else EMBEDDED_NAMES.sub(tiny_model, code)


def _wait_for_server(command: str, process: subprocess.Popen, timeout_s: float = 180) -> None:
    port = re.search(r"--port[ =](\d+)", command)
    if not port:
        raise ValueError(f"a background block needs --port N to wait for: {command!r}")
    url = f"http://127.0.0.1:{port.group(1)}/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"background command exited with {process.returncode}: {command!r}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def _setup_demo_adapter(tiny_model: str | None) -> None:
    model = tiny_model or "smollm2-135m"
    steps = "3" if tiny_model else "2"
    run_shell(f"lorakit train --model={shlex.quote(model)} --max_steps={steps} --output_dir=runs/demo --quiet "
              "--force --prompts=null")


SHELL_SYNTAX = re.compile(r"[|;&<>$`*?(){}\[\]~]")


def shell_commands(script: str) -> list[str]:
    """A shell block's commands, one per entry: `\\` continuations joined, a here-document kept with its command."""
    commands, lines = [], script.splitlines()
    i = 0
    while i < len(lines):
        command = lines[i]
        while command.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command.rstrip()[:-1] + " " + lines[i].strip()
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)", command)
        if heredoc:
            while i + 1 < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
                command += "\n" + lines[i]
        if command.strip() and not command.strip().startswith("#"):
            commands.append(command)
        i += 1
    return commands


def run_shell(script: str) -> None:
    """Run a shell block's commands in order. A plain `lorakit ...` command (no shell syntax beyond a trailing
    comment) runs in this process through the same entry point as the installed `lorakit` script, so each one
    does not pay for importing torch and transformers again; everything else runs in bash."""
    from lorakit.cli import main as lorakit_main  # the tiny-model pages need the package only when they run

    for command in shell_commands(script):
        words = shlex.split(command, comments=True)
        if words and words[0] == "lorakit" and not SHELL_SYNTAX.search(command.split(" #")[0]):
            try:
                code = lorakit_main(words[1:])
            except SystemExit as e:  # argparse errors
                code = e.code
            if code:
                raise subprocess.CalledProcessError(code, command)
        else:
            subprocess.run(["bash", "-euo", "pipefail", "-c", command], check=True, timeout=BLOCK_TIMEOUT_S)


def run_page(path: str, tiny_model: str | None) -> None:
    """Run the page's runnable blocks in order in the current directory (raises on the first failure)."""
    modes = ("run",) if tiny_model else ("integration",)
    for setup in page_setups(path):
        if setup != "demo-adapter":
            raise ValueError(f"{path}: unknown test-setup {setup!r}")
        _setup_demo_adapter(tiny_model)
    namespace: dict = {"__name__": "__main__"}
    background: list[subprocess.Popen] = []
    try:
        for block in page_blocks(path):
            if block.mode not in modes + ("background",) or block.language not in RUNNABLE_LANGUAGES:
                continue
            where = f"{os.path.basename(path)}:{block.line}"
            code = _substituted(block.code, tiny_model)
            print(f"--- {where} ({block.language}, {block.mode})", flush=True)
            if block.language == "python":
                exec(compile(code, where, "exec"), namespace)  # noqa: S102 (the docs' own code, on purpose)
                continue
            script = console_commands(code) if block.language == "console" else code
            if block.mode == "background":
                process = subprocess.Popen(["bash", "-c", "exec " + script.strip()])
                background.append(process)
                _wait_for_server(script, process)
            else:
                run_shell(script)
    finally:
        for process in background:
            process.terminate()
            process.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description="run a docs page's runnable code blocks in order")
    ap.add_argument("page")
    ap.add_argument("--workdir", required=True, help="an empty directory to run in")
    ap.add_argument("--tiny-model", default=None,
                    help="replace the embedded model's name with this model directory (run blocks only)")
    args = ap.parse_args()
    page = os.path.abspath(args.page)
    os.chdir(args.workdir)
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    run_page(page, args.tiny_model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
