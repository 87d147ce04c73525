"""The web page in a real headless Chromium against the API on an in-memory store, with the
controller ticked by the test and the sites' heartbeats written by it (no etcd, no agents:
test_browser.py runs the whole drill). What the page says must be what the code did: a new
service is unprotected until its first protected report, an enabled button's tooltip says
what it does (a disabled one why it is disabled), the state changes name their operation, a
request's notice ends with its outcome, the summary leaves out the table's alternatives, the
operation and its state changes say who asked for it (escaped like every value)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from aiohttp import web

from failover.api.app import make_app
from failover.api.users import Users, add_user
from failover.config import ClusterConfig, load
from failover.controller import Controller
from failover.coordination.memory import MemoryStore
from failover.fsm import Command
from failover.records import (
    Actor,
    CommandRecord,
    Heartbeat,
    ServiceHealth,
    command_key,
    heartbeat_key,
)
from tests.integration.chromium import headless_chromium
from tests.procs import REPO

webdriver = pytest.importorskip("selenium.webdriver")

TOKEN = "page-test-token-0123456789abcdef"
T = TypeVar("T")


class Site:
    """The API and a controller on one event loop in a thread; the test drives both."""

    def __init__(self, cfg: ClusterConfig, users: Users | str = TOKEN,
                 runbook: object | None = None) -> None:
        self.cfg, self.store = cfg, MemoryStore()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.controller = Controller(cfg, self.store, "c0")
        self.controller.leader_since = time.monotonic() - 10 * cfg.lease_ttl
        self.runner = web.AppRunner(make_app(cfg, self.store, users, runbook))
        self.url = self.run(self._start())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}/"

    def stop(self) -> None:
        self.run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def beat(self, site: str, role: str, epoch: int, **health: Any) -> None:
        hb = Heartbeat(site, time.time(), {"app": ServiceHealth(role, epoch, **health)})
        self.run(self.store.put(heartbeat_key(self.cfg.prefix, site), hb.encode()))

    def tick(self) -> str:
        (result,) = self.run(self.controller.tick())
        return result.message


def cluster(workdir: str, **policy: Any) -> ClusterConfig:
    path = os.path.join(workdir, "c.json")
    with open(path, "w") as fh:
        json.dump({"cluster": "page", "etcd": ["127.0.0.1:2379"],
                   "sites": {"east": {"address": "10.0.0.1"}, "west": {"address": "10.0.0.2"}},
                   "services": {"app": {"primary": "east", "replica": "west",
                                        "policy": policy}}}, fh)
    return load(path)


@pytest.fixture
def site(workdir: str) -> Iterator[Site]:
    s = Site(cluster(workdir))
    try:
        yield s
    finally:
        s.stop()


ALICE: dict[str, str] = {}  # alice's token (an operator), made per test


@pytest.fixture
def alices_site(workdir: str) -> Iterator[Site]:
    """A users file with alice (operator) besides the admin token; the primary's grace is
    short, so losing it fails over automatically at the next ticks."""
    users = os.path.join(workdir, "users.json")
    ALICE["token"] = add_user(users, "alice", "operator")
    s = Site(cluster(workdir, grace=0.1), Users(users, token=TOKEN))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    with headless_chromium() as b:
        yield b


CARD = 'document.querySelector(\'[data-service="app"]\')'


class Page:
    """The page in the browser, read through fresh queries (it re-renders every second)."""

    def __init__(self, browser: Any, site: Site, token: str = TOKEN) -> None:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        self.b = browser
        self.wait = WebDriverWait(browser, 15, poll_frequency=0.2,
                                  ignored_exceptions=[StaleElementReferenceException])
        browser.get(f"{site.url}#token={token}")

    def js(self, expr: str) -> Any:
        return self.b.execute_script(f"return {expr}")

    def state(self) -> str:
        return str(self.js(f'{CARD} ? {CARD}.querySelector(".state").textContent : ""'))

    def titles(self) -> dict[str, tuple[bool, str]]:
        """Each button's (disabled, title)."""
        return {k: (bool(v[0]), str(v[1])) for k, v in self.js(
            f'Object.fromEntries([...{CARD}.querySelectorAll("button[data-op]")].map(b => '
            '[b.dataset.op, [b.disabled, b.title]]))').items()}

    def text(self, selector: str = "") -> str:
        return str(self.js(f'{CARD}{selector and f".querySelector({selector!r})"}.innerText'))

    def notice(self) -> str:
        return str(self.js('document.getElementById("notice").innerText'))

    def until(self, condition: Any) -> None:
        from selenium.common.exceptions import TimeoutException

        try:
            self.wait.until(lambda _: condition())
        except TimeoutException:
            raise AssertionError(f"page:\n{self.js('document.body.innerText')}") from None

    def click(self, op: str) -> None:
        self._confirm(f'{CARD}.querySelector(\'button[data-op="{op}"]\').click()')

    def request(self, op: str) -> None:
        """What a click sends, whether or not the button is enabled."""
        self._confirm(f'operate("app", "{op}")')

    def _confirm(self, script: str) -> None:
        from selenium.webdriver.support import expected_conditions as ec

        self.b.execute_script(script)
        self.wait.until(ec.alert_is_present())
        self.b.switch_to.alert.accept()


def test_a_new_service_and_the_buttons_say_what_is_true(site: Site, browser: Any) -> None:
    # a new service: the primary serves, its replica's initial sync has not finished
    # (its agent reports lag 0: every write it captured is acknowledged, the copy is not done)
    site.beat("east", "primary", 1, data_path="running", protected=False, lag_seconds=0.0)
    site.beat("west", "replica", 1, data_path="running")
    site.tick()
    page = Page(browser, site)
    page.until(lambda: page.state() == "unprotected")
    assert "replication lag none yet (no consistent copy) (RPO budget" in page.text(), page.text()
    assert "0.00 s" not in page.text(), page.text()
    # the --token-file user is named as its role: not "admin (admin)"
    who = str(page.js('document.getElementById("who").innerText'))
    assert who.startswith("signed in as admin") and "(admin)" not in who, who
    assert page.js('document.getElementById("who").hidden') is False  # shown, Sign out too
    t = page.titles()
    assert t["switchover"] == (True, "only from healthy (the service is unprotected)"), t
    assert t["failback"] == (True, "already at home (east)"), t
    assert t["retry"] == t["cancel"] == (True, "only when an operation failed"), t
    assert t["failover"] == (True, "the replica west holds no consistent copy yet (initial "
                             "sync or resync); the controller refuses a failover to it (drctl "
                             "failover --force promotes it anyway)"), t
    assert "healthy" not in page.text(), page.text()
    assert "recent state changes" in page.text() and "recent operations" not in page.text()
    # the page names an icon the API serves (no 404 in the console)
    assert page.js('document.querySelector("link[rel=icon]").getAttribute("href")') == \
        "/favicon.svg"
    for path in ("favicon.svg", "favicon.ico"):
        with urllib.request.urlopen(site.url + path) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("image/svg+xml")

    # a failover to the replica that never synced, sent anyway (the API takes it: a page
    # rendered before, a script): the controller refuses it, and the notice says so instead
    # of staying "queued"
    page.request("failover")
    page.until(lambda: "failover of app (operation " in page.notice())
    site.tick()
    page.until(lambda: "not carried out" in page.notice())
    assert "the replica holds no consistent copy" in page.notice(), page.notice()
    assert page.state() == "unprotected"

    # protected for the first time: healthy, and every enabled button says what it does
    site.beat("east", "primary", 1, data_path="running", protected=True, lag_seconds=0.1)
    site.tick()
    page.until(lambda: page.state() == "healthy")
    assert "replication lag 0.10 s of" in page.text(), page.text()
    t = page.titles()
    assert t["switchover"] == (False, "Drain to zero lag behind a write barrier, then swap "
                                      "the roles"), t
    assert t["failover"] == (False, "Fence the primary now and promote the replica"), t
    assert "an operation is running" not in json.dumps(t), t
    assert "unprotected → healthy" in page.text(".changes"), page.text(".changes")


def test_a_switchover_from_the_page_ends_with_its_outcome(site: Site, browser: Any) -> None:
    site.beat("east", "primary", 1, data_path="running", protected=True, lag_seconds=0.1)
    site.beat("west", "replica", 1, data_path="running")
    site.tick()
    page = Page(browser, site)
    page.until(lambda: page.state() == "healthy")
    # queued, in progress, then its outcome replaces the notice
    page.click("switchover")
    page.until(lambda: "switchover of app (operation " in page.notice()
               and "queued" in page.notice())
    site.tick()
    page.until(lambda: page.state() == "draining" and "in progress (draining)" in page.notice())
    site.beat("east", "primary", 1, data_path="running", protected=True, lag_seconds=0.0,
              barrier=True)
    site.tick()
    page.until(lambda: page.state() == "fencing")
    # what happened, not every way the table's row can be taken ("..., or manual failover")
    summary = page.text(".summary")
    assert summary == "draining -> fencing: zero lag behind the write barrier: no data loss", \
        summary
    site.beat("east", "fenced", 2)
    site.tick()
    page.until(lambda: page.state() == "promoting")
    # the record names west before west's agent reports it serves: the header says so
    assert "primary west (not serving yet: promoting) · replica east" in page.text(), \
        page.text()
    site.beat("west", "primary", 2, data_path="running", protected=False)
    for _ in range(4):
        if "-> failed_over" in site.tick():
            break
    page.until(lambda: page.state() == "failed_over")
    page.until(lambda: ": the service was failed_over, primary west)" in page.notice()
               and ": done (" in page.notice())
    assert "queued" not in page.notice() and "in progress" not in page.notice()
    changes = page.text(".changes")
    # (the --token-file user: admin, role admin)
    assert "rerouting → failed_over (switchover to west, asked by admin)" in changes, \
        changes
    assert "healthy → draining (switchover to west, asked by admin)" in changes, changes
    assert "unprotected → healthy" in changes and "unprotected → healthy (" not in changes
    assert "after switchover to west" in page.text(), page.text()
    # east is fenced, not yet a replica: no lag figure, and no failover the controller refuses
    assert "replication lag none: no replica until the former primary east is back as one " \
        "(RPO budget" in \
        page.text(), page.text()
    assert page.titles()["failover"] == (True, "the former primary east is not back as a "
                                         "replica yet: there is nothing to fail over to")
    # said on the page too, not only in the disabled button's tooltip
    assert page.text(".failover-unavailable") == (
        "Failover unavailable: the former primary east is not back as a replica yet: there is "
        "nothing to fail over to"), page.text()
    last = page.text(".last-operation")
    assert last.startswith("last operation: switchover to west, asked by admin at "), last
    assert "; from east, started " in last and last.endswith(": done"), last


@pytest.fixture
def drill_site(workdir: str) -> Iterator[Site]:
    """With a runbook (the page offers drills): runbooks/examples/two-site-web.yaml."""
    from runbooks.loader import load as load_runbook

    rb = load_runbook(os.path.join(REPO, "runbooks", "examples", "two-site-web.yaml"))
    s = Site(cluster(workdir), runbook=rb)
    try:
        yield s
    finally:
        s.stop()


def test_buttons_follow_what_the_controller_takes(drill_site: Site, browser: Any) -> None:
    site = drill_site
    site.beat("east", "primary", 1, data_path="running", protected=True, lag_seconds=0.1)
    site.beat("west", "replica", 1, data_path="running")
    site.tick()
    page = Page(browser, site)
    page.until(lambda: page.state() == "healthy")
    t = page.titles()
    assert t["drill"] == (False, "Clone the replica and check it; production is not touched"), t
    assert t["failover"] == (False, "Fence the primary now and promote the replica"), t
    # the replica's site stops reporting: nothing to clone, nothing to fail over to; and the
    # controller refuses the failover the page would not send (a script sends it anyway)
    site.run(site.store.delete_if(heartbeat_key(site.cfg.prefix, "west"),
                                  site.store.entries[heartbeat_key(site.cfg.prefix,
                                                                   "west")].mod_revision))
    site.tick()
    page.until(lambda: page.state() == "unprotected")
    t = page.titles()
    assert t["drill"] == (True, "the replica site west is not reporting: nothing to clone"), t
    assert t["failover"] == (True, "the replica site west is down: nothing could take over"), t
    page.request("failover")
    page.until(lambda: "failover of app (operation " in page.notice())
    site.tick()
    page.until(lambda: "not carried out" in page.notice())
    assert "the replica site is not alive" in page.notice(), page.notice()
    # back, but 45 s behind with a 30 s budget: refused too, and the page says why
    site.beat("west", "replica", 1, data_path="running")
    site.beat("east", "primary", 1, data_path="running", protected=True, lag_seconds=45.0)
    site.tick()
    page.until(lambda: page.titles()["failover"][0] and "45.0 s behind" in
               page.titles()["failover"][1])
    page.request("failover")
    page.until(lambda: "queued" in page.notice())
    site.tick()
    page.until(lambda: "not carried out" in page.notice() and "replica lag 45.0s, RPO "
               "budget 30s" in page.notice())
    # the primary falls silent: its last lag figure is shown as such (the controller decides
    # with it)
    site.run(site.store.delete_if(heartbeat_key(site.cfg.prefix, "east"),
                                  site.store.entries[heartbeat_key(site.cfg.prefix,
                                                                   "east")].mod_revision))
    site.tick()
    page.until(lambda: "replication lag 45.00 s (last reported: the primary is silent) of"
               in page.text())


ASKED_AT = r"at \d{1,2}:\d{2}:\d{2}( [AP]M)?"


def test_the_page_says_who_asked_for_an_operation(alices_site: Site, browser: Any) -> None:
    import re

    site = alices_site
    site.beat("east", "primary", 1, data_path="running", protected=True, lag_seconds=0.1)
    site.beat("west", "replica", 1, data_path="running")
    site.tick()
    page = Page(browser, site, ALICE["token"])
    page.until(lambda: page.state() == "healthy")
    assert page.js('document.getElementById("user").textContent') == "alice"
    # alice's switchover: queued, then the operation line and its state change name her
    page.click("switchover")
    page.until(lambda: "queued: switchover, asked by alice (operator)" in page.text())
    site.tick()
    page.until(lambda: page.state() == "draining")
    line = page.text(".last-operation")
    assert re.match(r"operation: switchover to west, asked by alice \(operator\) "
                    + ASKED_AT + r"; from east, started .*: in progress$", line), line
    assert "healthy → draining (switchover to west, asked by alice (operator))" in \
        page.text(".changes"), page.text(".changes")

    # the primary lost mid-drain: the drain is abandoned; then the grace runs out and the
    # controller fails over by itself: "automatic (controller c0)", not a user
    site.run(site.store.delete_if(heartbeat_key(site.cfg.prefix, "east"),
                                  site.store.entries[heartbeat_key(site.cfg.prefix,
                                                                   "east")].mod_revision))
    for _ in range(10):  # draining -> (abandoned) -> primary_suspect -> fencing
        site.tick()
        if site.run(_state(site)) == "fencing":
            break
        time.sleep(0.15)
    page.until(lambda: page.state() == "fencing")
    line = page.text(".last-operation")
    assert re.match(r"operation: failover to west, automatic \(controller c0\) " + ASKED_AT
                    + "; from east, started ", line), line
    assert "(failover to west, automatic (controller c0))" in page.text(".changes")
    assert "asked by alice" not in page.text(".last-operation")


async def _state(site: Site) -> str:
    from failover.records import service_record, state_key

    key = state_key(site.cfg.prefix, "app")
    raw = (await site.store.snapshot(key)).value(key)
    return str(service_record(raw, "east", "west").state)


def test_who_asked_is_escaped_on_the_page(site: Site, browser: Any) -> None:
    """A name is shown as text, never as markup (a CLI user's name is whatever the host
    says)."""
    site.beat("east", "primary", 1, data_path="running", protected=True, lag_seconds=0.1)
    site.beat("west", "replica", 1, data_path="running")
    site.tick()
    evil = '<img src=x id="evil" onerror="document.title=1">'
    rec = CommandRecord(Command.SWITCHOVER, None, "op1", time.time(), Actor(evil, via="cli"))
    assert site.run(site.store.create(command_key(site.cfg.prefix, "app"), rec.encode()))
    page = Page(browser, site)
    page.until(lambda: "queued: switchover" in page.text())
    assert f"queued: switchover, asked by {evil} (drctl CLI)" in page.text(), page.text()
    site.tick()
    page.until(lambda: page.state() == "draining")
    assert f"switchover to west, asked by {evil} (drctl CLI) at " in \
        page.text(".last-operation")
    assert page.js('document.getElementById("evil")') is None
    assert page.js("document.querySelectorAll('[data-service] img').length") == 0
