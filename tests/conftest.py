from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from tests.procs import Target, stop_all


@pytest.fixture
def workdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="drctl-test-") as d:
        yield d


@pytest.fixture
def target(workdir: str) -> Iterator[Target]:
    t = Target(workdir).start()
    try:
        yield t
    finally:
        code = t.stop()
        log = t.proc.log() if t.proc else ""
        assert "Traceback" not in log, f"target daemon logged a traceback:\n{log[-4000:]}"
        assert code in (0, None, -9), f"target exited {code}:\n{log[-4000:]}"


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
