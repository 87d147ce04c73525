from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from tests.procs import Pki, Target, pki, stop_all


@pytest.fixture
def workdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="drctl-test-") as d:
        yield d


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "insecure: the `target` fixture runs with --insecure "
                            "(plaintext: for tests that need to see or break the wire)")


@pytest.fixture
def target(workdir: str, request: pytest.FixtureRequest) -> Iterator[Target]:
    """Site west's target daemon over mutual TLS, written by east (tests/procs.py)."""
    t = Target(workdir, tls=request.node.get_closest_marker("insecure") is None).start()
    try:
        yield t
    finally:
        code = t.stop()
        log = t.proc.log() if t.proc else ""
        assert "Traceback" not in log, f"target daemon logged a traceback:\n{log[-4000:]}"
        assert code in (0, None, -9), f"target exited {code}:\n{log[-4000:]}"


@pytest.fixture(scope="session")
def deployment() -> Pki:
    """The session's CA, site and operator certificates and epoch-token key."""
    return pki()


@pytest.fixture
def state_dir(workdir: str) -> str:
    return os.path.join(workdir, "state")


@pytest.fixture(autouse=True)
def _stop_started_processes() -> Iterator[None]:
    """Whatever a test started through tests.procs is stopped by PID when it ends."""
    try:
        yield
    finally:
        stop_all()


@pytest.fixture(autouse=True)
def _audit_mirrors_stay_in_the_test(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The audit log's default local mirror ($XDG_STATE_HOME/drctl/audit/) of every drctl
    process a test starts goes to a directory of its own, not the user's home."""
    with tempfile.TemporaryDirectory(prefix="drctl-state-") as d:
        monkeypatch.setenv("XDG_STATE_HOME", d)
        yield
