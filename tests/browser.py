"""Headless Chromium through selenium, for the browser tests and docs/make_screenshots.py (Debian's `chromium` and
`chromium-driver`; headless as root needs --no-sandbox)."""

import shutil

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
HOW = ("browser tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
       "`make test` through .ci/run installs them) and selenium (pip install -e '.[dev]')")


def start_chrome(width: int = 1200, height: int = 900):
    """A headless Chrome that keeps the page's console log (read it with driver.get_log("browser"))."""
    from selenium import webdriver  # imports inside functions: selenium is a dev extra; callers skip without it
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def chrome_or_skip(width: int = 1200, height: int = 900):
    """start_chrome, or skip the test saying how to get the browser (selenium, chromium, chromedriver)."""
    import pytest

    pytest.importorskip("selenium.webdriver", reason=HOW)
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(HOW)
    return start_chrome(width, height)


def console_errors(driver) -> list[dict]:
    """The page's console entries at level SEVERE (errors, failed loads)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait(driver, condition, seconds: float = 60):
    """Until condition(driver) is truthy (its value), at most `seconds`; an element the page re-rendered meanwhile
    (stale) or has not rendered yet just means: look again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = [NoSuchElementException, StaleElementReferenceException]
    return WebDriverWait(driver, seconds, ignored_exceptions=ignored).until(condition)


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def options(driver, select_id):
    """The values a select offers, read in one script (the page re-renders lists while it refreshes them)."""
    return driver.execute_script(f"return [...document.querySelectorAll('#{select_id} option')].map(o => o.value)")


def choose(driver, select_id, value):
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, select_id)).select_by_value(value)


def type_into(driver, element_id, text):
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(text)


def open_tab(driver, name, seconds: float = 60):
    """The playground's view `name` (chat, compare, adapters, runs), once it is shown."""
    by_id(driver, f"tab-{name}").click()
    wait(driver, lambda d: by_id(d, f"view-{name}").is_displayed(), seconds)
