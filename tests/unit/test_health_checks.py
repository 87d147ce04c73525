"""Health checks of the new primary whichever site it is: {site_address} in http: and tcp:
(failover/steprun.py), set by the site that runs them, and `drctl runbook check --site`."""

from __future__ import annotations

import asyncio
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from failover.steprun import expand, health_check
from failover.steps import StepKind, StepSpec
from tests.procs import DRCTL, run
from tests.runbooks.helpers import TWO_SITES_DB


def runbook(tmp_path: Any, *steps: str, a: str = "10.0.0.1") -> str:
    """A runbook file: TWO_SITES_DB (site a at address ``a``), db's steps a promote and
    ``steps``."""
    path = os.path.join(tmp_path, "rb.yaml")
    with open(path, "w") as fh:
        fh.write(TWO_SITES_DB.replace("address: 10.0.0.1", f"address: {a}")
                 + "    steps:\n      - {type: promote}\n"
                 + "".join(f"      - {step}\n" for step in steps))
    return path


@pytest.fixture
def closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@pytest.fixture
def listener() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_site_address_is_the_address_of_the_site_that_checks(listener: int) -> None:
    spec = StepSpec(StepKind.HEALTH_CHECK, "db", tcp=f"{{site_address}}:{listener}", timeout=2)
    said = asyncio.run(health_check(spec, {"DRCTL_SITE_ADDRESS": "127.0.0.1"}))
    assert said == f"attempt 1: connected to 127.0.0.1:{listener}"
    # nobody set it (a check run by hand without --site): a clear failure, not a lookup of
    # "{site_address}" as a host name
    retried = StepSpec(StepKind.HEALTH_CHECK, "db", tcp=spec.tcp, retries=5, interval=10)
    with pytest.raises(RuntimeError, match=r"\{site_address\} needs \$DRCTL_SITE_ADDRESS"):
        asyncio.run(asyncio.wait_for(health_check(retried, {}), 5))  # no retries: at once
    assert expand("http://{site_address}:8080/h", {"DRCTL_SITE_ADDRESS": "::1"}) == \
        "http://[::1]:8080/h"
    assert expand("http://10.0.0.2/h", {}) == "http://10.0.0.2/h"


def test_http_check_with_site_address() -> None:
    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        spec = StepSpec(StepKind.HEALTH_CHECK, "app", http=f"http://{{site_address}}:{port}/")
        said = asyncio.run(health_check(spec, {"DRCTL_SITE_ADDRESS": "127.0.0.1"}))
        assert said == f"attempt 1: HTTP 200 from http://127.0.0.1:{port}/"
    finally:
        server.shutdown()
        server.server_close()


def test_runbook_check_as_a_site(tmp_path: Any, listener: int) -> None:
    path = runbook(tmp_path, f"{{type: health_check, name: up, tcp: '{{site_address}}:"
                             f"{listener}', timeout: 2}}", a="127.0.0.1")
    p = run([*DRCTL, "runbook", "check", path, "db", "--site", "a"],
            env={"DRCTL_SITE_ADDRESS": ""})
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"health check: up: attempt 1: connected to 127.0.0.1:{listener}" in p.stdout
    # without --site: one line, at once, before any check runs (its retries would only
    # repeat it)
    p = run([*DRCTL, "runbook", "check", path, "db"], env={"DRCTL_SITE_ADDRESS": ""})
    assert p.returncode == 2 and p.stdout == "" and p.stderr == (
        "drctl: error [usage]: the check 'up' names the address of the site that runs it: "
        "give --site NAME (or set $DRCTL_SITE_ADDRESS)\n"), p.stdout + p.stderr
    p = run([*DRCTL, "runbook", "check", path, "db", "--site", "north"])
    assert p.returncode == 2 and p.stderr.strip() == (
        f"drctl: error [usage]: --site north: not a site of {path} (sites: a, b)"), p.stderr


def test_checks_the_loader_refuses_and_run_step_never_raises(tmp_path: Any) -> None:
    from failover.steprun import run_step
    from runbooks.loader import RunbookError
    from runbooks.loader import load as load_runbook

    path = runbook(tmp_path, "{type: health_check, http: 'http://[{site_address}]:80/'}",
                   "{type: health_check, http: 'http://{site_address}:8o80/'}",
                   "{type: health_check, command: 'pg_isready -h {site_address}'}")
    with pytest.raises(RunbookError) as info:
        load_runbook(path)
    fields = [e.split(": ")[1] for e in info.value.errors]
    assert fields == ["services.db.steps[1].http", "services.db.steps[2].http",
                      "services.db.steps[3].command"], info.value.errors
    # a URL urllib cannot use (written in a cluster of another version, say): the step
    # fails with the reason, it does not raise into the agent
    spec = StepSpec(StepKind.HEALTH_CHECK, "x", http="http://[10.0.0.1]:80/", timeout=1)
    got = asyncio.run(run_step(spec, {}))
    assert got.status == "failed" and "cannot be in brackets" in got.output, got


def test_addresses_the_checks_and_etcd_use_are_checked(tmp_path: Any) -> None:
    from runbooks.loader import RunbookError
    from runbooks.loader import load as load_runbook

    path = os.path.join(tmp_path, "rb.yaml")
    with open(path, "w") as fh:
        fh.write("kind: drctl-runbook\nversion: 1\ncluster: c\n"
                 "etcd: ['::1', ' 127.0.0.1:2379', '[::1]:2379']\n"
                 "sites: {a: {address: '[::1]'}, b: {address: '10.0.0.2:80'}, "
                 "c: {address: '::1'}}\n"
                 "services:\n  db:\n    primary: c\n    replica: a\n    steps:\n"
                 "      - {type: promote}\n"
                 "      - {type: health_check, tcp: '[{site_address}]:80'}\n")
    with pytest.raises(RunbookError) as info:
        load_runbook(path)
    said = "\n".join(info.value.errors)
    assert "etcd: invalid address '::1': an IPv6 address needs brackets and a port, " \
        "[::1]:PORT; invalid address ' 127.0.0.1:2379': spaces around it" in said, said
    assert "sites.a.address" in said and "sites.b.address" in said, said
    assert "sites.c.address" not in said, said  # an IPv6 address, as it is
    assert "services.db.steps[1].tcp" in said, said


def test_a_failed_check_names_what_it_tried(closed_port: int) -> None:
    port = closed_port
    for spec, said in ((StepSpec(StepKind.HEALTH_CHECK, "t", tcp=f"127.0.0.1:{port}",
                                 timeout=2), f"attempt 1: connect 127.0.0.1:{port}: "),
                       (StepSpec(StepKind.HEALTH_CHECK, "h", http=f"http://127.0.0.1:{port}/",
                                 timeout=2), f"attempt 1: GET http://127.0.0.1:{port}/: ")):
        with pytest.raises(RuntimeError) as info:
            asyncio.run(health_check(spec, {}))
        assert str(info.value).startswith(said) and "refused" in str(info.value), info.value


def test_runbook_check_says_a_failure_in_one_line(tmp_path: Any, closed_port: int) -> None:
    from failover.steprun import failed_attempts

    assert failed_attempts("attempt 1: a\nattempt 2: b") == "2 attempts failed; last: b"
    assert failed_attempts("attempt 1: a") == "a"
    assert failed_attempts("attempt 1: exit 1: x\ny") == "attempt 1: exit 1: x | y"
    port = closed_port
    path = runbook(tmp_path, f"{{type: health_check, name: up, tcp: '{{site_address}}:{port}',"
                             " timeout: 1, retries: 1, interval: 0.1}", a="127.0.0.1")
    p = run([*DRCTL, "runbook", "check", path, "db", "--site", "a"])
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FAIL") and lines[0].endswith(
        f"health check: up: 2 attempts failed; last: connect 127.0.0.1:{port}: "
        "Connection refused"), p.stdout
    # a retry schedule is not silent: each failed attempt that another follows, on stderr
    assert p.stderr.rstrip("\n").splitlines() == [
        f"  up: attempt 1 of 2 failed: connect 127.0.0.1:{port}: Connection refused; again "
        "in 0.1s"], p.stderr


def test_a_check_that_never_answers_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """An attempt stopped by the check's own deadline (its timeout + 1 s) names it: the
    TimeoutError that stops it says nothing ("attempt 1: " and an empty reason before)."""
    from failover import steprun

    async def hangs(spec: StepSpec, env: dict[str, str]) -> str:
        await asyncio.sleep(60)
        return "never"

    monkeypatch.setattr(steprun, "probe", hangs)
    spec = StepSpec(StepKind.HEALTH_CHECK, "t", command="true", timeout=0.1)
    with pytest.raises(RuntimeError) as info:
        asyncio.run(health_check(spec, {}))
    assert str(info.value) == "attempt 1: no answer within 1.1s", info.value
