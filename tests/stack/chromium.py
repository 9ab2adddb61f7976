"""Debian's headless Chromium through chromedriver (selenium), for the browser tests; they skip
with the reason when chromium or chromedriver is missing."""

import shutil
from pathlib import Path

import pytest


def browser_paths() -> tuple[str, str]:
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(
            "chromium or chromedriver not found on PATH (Debian: apt-get install chromium "
            "chromium-driver)"
        )
    return chromium, driver


def chrome(tmp: Path, *flags: str, timeout: float = 30):
    """A headless Chromium with its profile in `tmp` and the extra `flags`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = browser_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--no-first-run",
        "--disable-background-networking",
        f"--user-data-dir={tmp}",
        "--window-size=1280,1000",
        *flags,
    ):
        opts.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    browser.set_page_load_timeout(timeout)
    browser.set_script_timeout(timeout)
    return browser
