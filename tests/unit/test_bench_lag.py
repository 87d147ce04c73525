"""bench/capture.py fails a run, rather than reporting it, when the lag does not return to 0
before a measured phase (the backlog of one phase must not leak into the next)."""

from __future__ import annotations

import argparse
import http.server
import threading
from collections.abc import Iterator

import pytest

from bench.capture import Pair


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def agent() -> Iterator[tuple[int, type[_Metrics]]]:
    handler = type("Handler", (_Metrics,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def _pair(port: int) -> Pair:
    p = Pair.__new__(Pair)
    p.name, p.wrap_src, p.procs, p.mport = "loopback", [], [], port
    p.args = argparse.Namespace(drain_timeout=1.0)
    return p


def _serve(handler: type[_Metrics], lag: float, protected: int) -> None:
    handler.body = (f'drctl_replication_lag_seconds{{volume="v"}} {lag}\n'
                    f'drctl_replication_protected{{volume="v"}} {protected}\n').encode()


def test_a_phase_fails_when_the_lag_stays_above_zero(agent: tuple[int, type[_Metrics]]
                                                     ) -> None:
    port, handler = agent
    _serve(handler, 3.5, 1)
    with pytest.raises(SystemExit, match=r"lag did not return to 0 within 1 s before the 50% "
                                         r"run .*'last_lag': 3.5"):
        _pair(port).wait_drained("the 50% run")


def test_lag_zero_before_protection_does_not_count(agent: tuple[int, type[_Metrics]]) -> None:
    port, handler = agent
    _serve(handler, 0.0, 0)  # the agent's initial sync: the gauge reads 0 but proves nothing
    with pytest.raises(SystemExit, match="lag did not return to 0"):
        _pair(port).wait_drained("the 50% run")
    _serve(handler, 0.0, 1)
    assert _pair(port).wait_drained("the 50% run") < 1.0
