"""Headless Chromium for the page tests (Debian's chromium and chromium-driver), one profile
directory per browser, removed with it."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--window-size=1200,900")


@contextlib.contextmanager
def headless_chromium(*extra: str) -> Iterator[Any]:
    """A WebDriver with :data:`FLAGS` and ``extra``; the test is skipped without chromium."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="drctl-chromium-")
    opts = Options()
    opts.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={profile}", *extra):
        opts.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        yield b
    finally:
        b.quit()
        shutil.rmtree(profile, ignore_errors=True)
