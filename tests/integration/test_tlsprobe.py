"""replicator/transport/tlsprobe.py against real targets: one with mutual TLS (it asks for a
client certificate), one plaintext (--insecure), and a port nothing listens on."""

from __future__ import annotations

import asyncio
import os

from replicator.transport.tlsprobe import speaks_tls
from tests.procs import Target, free_port


def test_a_tls_target_is_told_from_a_plaintext_one_and_from_nothing(workdir: str) -> None:
    for d in ("tls", "plain"):
        os.mkdir(os.path.join(workdir, d))
    tls = Target(os.path.join(workdir, "tls")).start()
    plain = Target(os.path.join(workdir, "plain"), tls=False).start()
    try:
        assert asyncio.run(speaks_tls(tls.address)) is True
        assert asyncio.run(speaks_tls(plain.address)) is False
        assert asyncio.run(speaks_tls(f"127.0.0.1:{free_port()}")) is False
    finally:
        tls.stop()
        plain.stop()
