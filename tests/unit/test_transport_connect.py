"""How long a one-shot command waits for a target that does not answer, and what it says."""

from __future__ import annotations

import socket

import pytest

from replicator.errors import TargetUnavailableError
from replicator.transport import client as client_mod
from replicator.transport.security import ChannelSecurity


async def test_a_failed_connect_probes_for_its_reason_briefly() -> None:
    """A target that accepts but never completes a handshake: connect() gives up after its
    timeout and then probes for a reason for at most PROBE_TIMEOUT (it used to add 5 s, and a
    hang tells nothing however long it is given)."""
    asked: list[float] = []
    probe = client_mod.TargetClient._last_connect_error

    async def recorded(self: client_mod.TargetClient, timeout: float) -> str:
        asked.append(timeout)
        return await probe(self, timeout)

    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(8)
        c = client_mod.TargetClient(f"127.0.0.1:{lsock.getsockname()[1]}",
                                    ChannelSecurity.insecure())
        c._last_connect_error = recorded.__get__(c)  # type: ignore[method-assign]
        try:
            for timeout in (0.5, 2.5):
                with pytest.raises(TargetUnavailableError):
                    await c.connect(timeout)
        finally:
            await c.close()
    assert asked == [0.5, client_mod.PROBE_TIMEOUT] and client_mod.PROBE_TIMEOUT <= 2.0
