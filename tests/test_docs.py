"""The docs stay true: the site builds with --strict, every code block that claims to run runs (tests/docs_blocks.py),
the CLI reference comes from the parser, the README stays short, every public name has a docstring, and the built
site works in a real headless Chromium (home page, search, an API page: no console error)."""

import functools
import glob
import http.server
import inspect
import os
import subprocess
import sys
import threading

import pytest
from browser import chrome_or_skip, console_errors
from docs_blocks import RUNNABLE_LANGUAGES, page_blocks

import lorakit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted([os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)])
PAGE_IDS = [os.path.relpath(p, ROOT) for p in PAGES]
MAX_README_LINES = 200


def _pages_with(mode):
    return [p for p in PAGES if any(b.mode == mode and b.language in RUNNABLE_LANGUAGES for b in page_blocks(p))]


def test_every_code_block_says_whether_it_runs():
    unmarked, no_reason = [], []
    for page in PAGES:
        for block in page_blocks(page):
            where = f"{os.path.relpath(page, ROOT)}:{block.line}"
            if block.language in RUNNABLE_LANGUAGES and block.mode is None:
                unmarked.append(where)
            if block.mode == "skip" and not block.reason.strip("() "):
                no_reason.append(where)
    assert unmarked == [], "mark each block <!-- test: run|integration|background|skip (reason) -->"
    assert no_reason == [], "a skipped block says why"
    assert len(_pages_with("run")) >= 10  # the tutorials and how-tos really are run


def _run_page(page, workdir, tiny_model=None):
    for shared in ("configs", "examples"):  # blocks may name the repository's example files
        os.symlink(os.path.join(ROOT, shared), os.path.join(workdir, shared))
    command = [sys.executable, os.path.join(ROOT, "tests", "docs_blocks.py"), page, "--workdir", str(workdir)]
    if tiny_model:
        command += ["--tiny-model", tiny_model]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]


@pytest.mark.parametrize("page", _pages_with("run"), ids=lambda p: os.path.relpath(p, ROOT))
def test_page_code_blocks_run_on_a_tiny_model(page, tmp_path, tiny_model_dir):
    _run_page(page, tmp_path, tiny_model_dir)


@pytest.mark.integration
@pytest.mark.parametrize("page", _pages_with("integration"), ids=lambda p: os.path.relpath(p, ROOT))
def test_page_code_blocks_run_on_the_embedded_model(page, tmp_path):
    _run_page(page, tmp_path)


def test_readme_is_short_and_links_into_the_docs():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(readme.splitlines()) <= MAX_README_LINES
    linked = {line.split("](docs/", 1)[1].split(")", 1)[0].split("#")[0]
              for line in readme.splitlines() if "](docs/" in line}
    missing = [p for p in linked if not os.path.exists(os.path.join(ROOT, "docs", p))]
    assert linked and missing == []


def _public_members(obj):
    """(name, object) for obj's own public callables and properties defined in lorakit."""
    for cls in obj.__mro__:
        if not (cls.__module__ or "").startswith("lorakit"):
            continue
        for name, value in vars(cls).items():
            if name.startswith("_"):
                continue
            function = value.__func__ if isinstance(value, (staticmethod, classmethod)) else \
                value.fget if isinstance(value, property) else value
            if callable(function) or isinstance(value, property):
                yield f"{cls.__name__}.{name}", function


def test_every_public_name_has_a_docstring():
    missing = []
    for name in lorakit.__all__:
        obj = getattr(lorakit, name)
        if isinstance(obj, str):  # __version__
            continue
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(name)
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            missing += [n for n, f in _public_members(obj) if not (getattr(f, "__doc__", None) or "").strip()]
    assert sorted(set(missing)) == []


def _build_site(site_dir):
    """mkdocs build --strict in this process (so a test can change what the hooks read first)."""
    from mkdocs.commands.build import build  # imports inside functions: mkdocs is a dev extra, only these tests
    from mkdocs.config import load_config

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        config = load_config(os.path.join(ROOT, "mkdocs.yml"), site_dir=str(site_dir), strict=True)
        build(config)
    finally:
        os.chdir(cwd)


def test_site_builds_strict_with_no_warning(tmp_path):
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mkdocs"), "build", "--strict",
                           "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-6000:]
    assert "WARNING" not in done.stderr, done.stderr[-6000:]
    api = (tmp_path / "site" / "reference" / "python-api" / "index.html").read_text()
    assert 'id="lorakit.LoraConfig"' in api and "merge_and_unload" in api


def test_cli_reference_is_generated_from_the_parser(tmp_path, monkeypatch):
    from lorakit import cli

    real = cli.build_parser

    def with_a_fake_option():
        parser = real()
        serve = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
        serve.choices["serve"].add_argument("--fake-option-for-the-docs-test", help="a help text seen only here")
        return parser

    monkeypatch.setattr(cli, "build_parser", with_a_fake_option)
    _build_site(tmp_path / "site")
    page = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "--fake-option-for-the-docs-test" in page and "a help text seen only here" in page
    assert "--max-batch-size" in page and "--adapter-root" in page  # the real options too
    monkeypatch.setattr(cli, "build_parser", real)
    _build_site(tmp_path / "again")
    assert "--fake-option-for-the-docs-test" not in (tmp_path / "again" / "reference" / "cli" / "index.html").read_text()


@pytest.fixture(scope="module")
def served_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    _build_site(site)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_site_home_search_and_api_page_load_in_chromium_with_no_console_error(served_site):
    driver = chrome_or_skip()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(served_site + "/")
        assert "lorakit" in driver.title
        query = WebDriverWait(driver, 30).until(  # at this width the theme shows the search box in the header
            lambda d: d.find_element(By.CSS_SELECTOR, "input[data-md-component='search-query']"))
        query.click()
        query.send_keys("merge_and_unload")
        results = WebDriverWait(driver, 30).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".md-search-result__item"))
        assert results and "merge" in results[0].text.lower()
        assert console_errors(driver) == []
        driver.get(served_site + "/reference/python-api/")
        assert driver.find_element(By.ID, "lorakit.LoraConfig").is_displayed()
        assert console_errors(driver) == []
    finally:
        driver.quit()
