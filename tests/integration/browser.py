"""A real browser for the UI tests: Debian's chromium + chromium-driver, driven by Selenium, headless.

`make test` installs them (apt-get, as root). Where none can be installed the tests skip and say why — unless
PRUNEFLOW_REQUIRE_BROWSER=1 (CI sets it), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

BINARIES = {"chromium": ("chromium", "chromium-browser", "google-chrome"), "chromedriver": ("chromedriver",)}


def _which(names) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


def _missing(reason: str):
    if os.environ.get("PRUNEFLOW_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (PRUNEFLOW_REQUIRE_BROWSER=1: a browser is required here)")
    pytest.skip(reason)


def start(shots: Path):
    """A headless chromium that saves a screenshot and the page's text under ``shots`` on :func:`snap`."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (`make test` installs it)")
    browser, driver = _which(BINARIES["chromium"]), _which(BINARIES["chromedriver"])
    if not browser or not driver:
        _missing("no chromium / chromedriver on PATH (`make test` installs Debian's chromium and "
                 "chromium-driver with apt-get when run as root)")
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1800"):
        options.add_argument(arg)
    options.binary_location = browser
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for snap
    session = webdriver.Chrome(options=options, service=Service(driver))
    session.shots, session.console = shots, []
    shots.mkdir(parents=True, exist_ok=True)
    return session


def snap(session, name: str) -> str:
    """Screenshot, visible text and console of the current page; returns where they are, the start of the text
    and the console's warnings and errors (a failed API call shows there only) for a failure message."""
    png = session.shots / f"{name}.png"
    session.save_screenshot(str(png))
    text = session.find_element("tag name", "body").text
    console = read_console(session)
    (session.shots / f"{name}.txt").write_text(f"{session.current_url}\n\n{text}\n\nconsole:\n" + "\n".join(console))
    problems = [line for line in console if not line.startswith(("INFO", "DEBUG"))]
    return (f"screenshot {png}; page {session.current_url}: {text[:1000]!r}; "
            f"console {problems[-10:]!r}")


def read_console(session) -> list[str]:
    """Every console line of the session so far ("LEVEL message"; chromium hands each line out once)."""
    session.console.extend(f"{entry['level']} {entry['message']}" for entry in session.get_log("browser"))
    return session.console


def wait(session, condition, what: str, timeout: float = 60):
    """``condition(session)`` until truthy (returned); on timeout a failure with a screenshot of the page."""
    deadline = time.monotonic() + timeout
    error = None
    while time.monotonic() < deadline:
        try:
            value = condition(session)
            if value:
                return value
        except Exception as err:  # noqa: BLE001  (the page is still rendering)
            error = err
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last error: {error!r}); "
                f"{snap(session, what.replace(' ', '-')[:40])}")
