"""Does a target speak TLS? Asked before a command without a certificate calls one in
plaintext: gRPC's plaintext channel to a TLS server only retries until its connect timeout,
so the caller would learn nothing for that long, and then only "no connection"."""

from __future__ import annotations

import asyncio
import ssl

from drctl.argtypes import parse_hostport


async def speaks_tls(address: str, timeout: float = 3.0) -> bool:
    """Whether ``address`` (HOST:PORT) answers a TLS handshake: True once it completes, or
    the server ends it with a TLS alert (a server that asks for a client certificate); False
    if nothing listens, nothing answers in ``timeout`` seconds, or the server answers in
    anything but TLS (a plaintext gRPC server closes the connection)."""
    host, port = parse_hostport(address)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only asking whether it speaks TLS, not trusting it
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), port, ssl=ctx), timeout)
    except ssl.SSLError as exc:
        return "ALERT" in (exc.reason or "").upper()
    except (TimeoutError, OSError, EOFError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except (OSError, ssl.SSLError):
        pass
    return True
