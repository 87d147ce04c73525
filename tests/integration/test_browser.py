"""The one-click failover in a real headless Chromium against the full local drill
(drctl.demo: etcd, named, two sites with replication under load, controller, web page)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from drctl.demo import DemoCluster
from drctl.localservers import MissingBinary

webdriver = pytest.importorskip("selenium.webdriver")


@pytest.fixture
def demo() -> Iterator[DemoCluster]:
    cluster = DemoCluster()
    try:
        cluster.start()
    except MissingBinary as exc:
        cluster.stop()
        pytest.skip(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def browser() -> Iterator[object]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="drctl-chromium-")
    opts = Options()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 "--window-size=1200,900"):
        opts.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        yield b
    finally:
        b.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_click_failover_and_see_primary_and_dns_change(demo: DemoCluster,
                                                       browser: object) -> None:
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    b = browser
    b.get(f"{demo.url}#token={demo.token}")  # type: ignore[attr-defined]
    from selenium.common.exceptions import StaleElementReferenceException

    # the page re-renders every second: read and click through fresh queries
    wait = WebDriverWait(b, 30, poll_frequency=0.2,
                         ignored_exceptions=[StaleElementReferenceException])

    def card_text() -> str:
        return str(b.execute_script(  # type: ignore[attr-defined]
            'const e = document.querySelector(\'[data-service="app"]\');'
            'return e ? e.innerText : ""'))

    def click(op: str) -> None:
        b.execute_script(  # type: ignore[attr-defined]
            f'document.querySelector(\'[data-service="app"] button[data-op="{op}"]\').click()')

    wait.until(lambda _: "primary east" in card_text() and "10.0.0.1" in card_text()
               and "healthy" in card_text().lower())
    wait.until(lambda _: "lag unknown" not in card_text())
    # a drill first: the replica is cloned and checked while replication goes on
    click("drill")
    wait.until(ec.alert_is_present())
    b.switch_to.alert.accept()  # type: ignore[attr-defined]
    wait.until(lambda _: ": passed" in card_text() or ": failed" in card_text())
    assert ": passed" in card_text() and "RPO" in card_text() and "RTO" in card_text(), \
        card_text()
    assert "primary east" in card_text()  # production untouched
    click("failover")
    wait.until(ec.alert_is_present())
    b.switch_to.alert.accept()  # type: ignore[attr-defined]
    wait.until(lambda _: "primary west" in card_text())
    wait.until(lambda _: b.execute_script(  # type: ignore[attr-defined]
        'return [...document.querySelectorAll(\'[data-service="app"] .dns-answer\')]'
        '.every(e => e.innerText === "10.0.0.2")'))
    text = card_text()
    assert "epoch 2" in text
    assert "failed_over" in text.lower() or "healthy" in text.lower()
    shot = os.environ.get("DRCTL_SCREENSHOT")
    if shot:
        b.save_screenshot(shot)  # type: ignore[attr-defined]
