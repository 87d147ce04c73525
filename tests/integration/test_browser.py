"""The one-click lifecycle in a real headless Chromium against the full local drill
(drctl.demo: etcd, named, two site agents running their data paths, an application writing
through the primary's export, controller, web page): Drill, Failover, re-protect, Failback."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from drctl.demo import DemoCluster
from tests.integration.chromium import headless_chromium
from tests.integration.test_demo import started_demo

webdriver = pytest.importorskip("selenium.webdriver")


@pytest.fixture
def demo() -> Iterator[DemoCluster]:
    cluster = started_demo()
    try:
        yield cluster
    finally:
        stopped = cluster.stop()
        print(stopped)
    # every process was running and stops on SIGTERM (none had exited, none is killed), and
    # the line says what was stopped
    assert stopped.startswith("stopped: ") and "killed" not in stopped, stopped
    assert "exited already" not in stopped, stopped
    assert "named and etcd stopped" in stopped, stopped


@pytest.fixture
def browser(demo: DemoCluster) -> Iterator[object]:
    # the page is HTTPS with the demo CA's certificate: trust exactly its key
    with headless_chromium("--disable-quic",
                           f"--ignore-certificate-errors-spki-list={demo.api_spki()}") as b:
        yield b


def test_click_failover_wait_for_reprotect_then_failback(demo: DemoCluster,
                                                         browser: object) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    b = browser
    b.get(f"{demo.url}#token={demo.token}")  # type: ignore[attr-defined]
    # the page re-renders every second: read and click through fresh queries
    wait = WebDriverWait(b, 90, poll_frequency=0.2,
                         ignored_exceptions=[StaleElementReferenceException])
    shots = os.environ.get("DRCTL_SCREENSHOT_DIR")
    seen: list[str] = []

    def card_text() -> str:
        text = str(b.execute_script(  # type: ignore[attr-defined]
            'const e = document.querySelector(\'[data-service="app"]\');'
            'return e ? e.innerText : ""'))
        state = text.split("·")[1].strip().lower() if "·" in text else ""
        if state and (not seen or seen[-1] != state):
            seen.append(state)
        return text

    def shot(name: str) -> None:
        if shots:
            b.save_screenshot(os.path.join(shots, f"{name}.png"))  # type: ignore[attr-defined]

    def click(op: str) -> None:
        b.execute_script(  # type: ignore[attr-defined]
            f'document.querySelector(\'[data-service="app"] button[data-op="{op}"]\').click()')
        wait.until(ec.alert_is_present())
        b.switch_to.alert.accept()  # type: ignore[attr-defined]

    def serving(site: str, address: str) -> bool:
        text = card_text()
        state = text.split("·")[1].strip().lower() if "·" in text else ""
        # (the state itself: the card's history says "→ healthy" long before)
        return (f"primary {site}" in text and state == "healthy"
                and b.execute_script(  # type: ignore[attr-defined]
                    'return [...document.querySelectorAll(\'[data-service="app"] .dns-answer\')]'
                    f'.every(e => e.innerText === "{address}")'))

    wait.until(lambda _: serving("east", "10.0.0.1") and "lag unknown" not in card_text())
    shot("1-protected-at-east")
    # a drill first: the replica is cloned and checked while replication goes on
    click("drill")
    wait.until(lambda _: ": passed" in card_text() or ": failed" in card_text())
    assert ": passed" in card_text() and "RPO" in card_text() \
        and "standby steps" in card_text(), \
        card_text()
    assert "primary east" in card_text()  # production untouched
    click("failover")
    wait.until(lambda _: "primary west" in card_text())
    shot("2-failed-over-to-west")
    # east is fenced, demoted and re-protected by the exact delta: healthy again, at west
    wait.until(lambda _: serving("west", "10.0.0.2"))
    shot("3-reprotected-at-west")
    assert "epoch 2" in card_text()
    click("failback")
    wait.until(lambda _: "draining" in seen or "primary east" in card_text())
    wait.until(lambda _: serving("east", "10.0.0.1"))
    shot("4-home-at-east")
    assert "epoch 3" in card_text(), card_text()
    # the page lists the phases it went through (failback: the runbook's precheck, drain,
    # fence, promote, re-protect)
    text = card_text()
    for step in ("healthy → preparing", "preparing → draining", "draining → fencing",
                 "fencing → promoting", "failed_over → resyncing", "resyncing → healthy"):
        assert step in text, text
