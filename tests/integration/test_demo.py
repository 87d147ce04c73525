"""drctl.demo when a server it needs dies under it: it says which and stops, and keeps the
logs that explain it (the browser test runs the demo's lifecycle itself)."""

from __future__ import annotations

import os
import shutil
import threading
from typing import Any

import pytest

from drctl.demo import DemoCluster, _gone, _sample
from drctl.localservers import MissingBinary


def started_demo() -> DemoCluster:
    """The demo's processes, started (the test is skipped if a server binary is missing)."""
    demo = DemoCluster()
    try:
        demo.start()
    except MissingBinary as exc:
        demo.stop()
        pytest.skip(str(exc))
    return demo


def test_the_demo_stops_when_a_server_it_needs_dies(capsys: Any) -> None:
    demo = started_demo()
    try:
        stopping = threading.Event()
        assert demo.dead() == {} and not _gone(demo, stopping)
        assert demo.etcd is not None and demo.etcd.proc is not None
        demo.etcd.proc.kill()
        demo.etcd.proc.wait()
        assert _gone(demo, stopping) and stopping.is_set()
        said = capsys.readouterr().out
        assert f"the demo cannot go on: etcd (status -9) exited (logs in {demo.work})" in said
        # the API's process dies: the status line says so in words, not an exception's repr
        demo.procs["api"].kill()
        demo.procs["api"].wait()
        app, line = _sample(demo)
        assert app is None and line.startswith(
            f"status unavailable: the API at {demo.url} does not answer ("), line
    finally:
        stopped = demo.stop()
    try:
        assert "api had exited already (status -9)" in stopped, stopped
        assert "named and etcd (had exited already) stopped" in stopped, stopped
        assert stopped.endswith(f"{demo.work} kept (its logs)"), stopped
        # the logs that say why: the drctl processes' and the server's that died
        for log in ("api.log", "etcd.log"):
            assert os.path.getsize(os.path.join(demo.work, log)) > 0, log
    finally:
        shutil.rmtree(demo.work, ignore_errors=True)
