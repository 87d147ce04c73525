"""Why this host cannot listen on an address, in words an operator can act on.

The daemons check their listening addresses before they create anything (a replica directory,
a state directory), and translate the error of a bind that fails anyway; both use
``bind_problem``. Callers raise their own package's error with the flag named."""

from __future__ import annotations

import errno
import socket

_WORDS = {
    errno.EADDRINUSE: "address already in use (another socket on this host has that port)",
    errno.EADDRNOTAVAIL: "this host has no such address",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}
BIND_ERRNOS = frozenset(_WORDS)


def describe(exc: OSError) -> str:
    """A failed bind's reason."""
    if exc.errno in _WORDS:
        return _WORDS[exc.errno]
    return exc.strerror or str(exc)


def bind_problem(host: str, port: int) -> str | None:
    """Why binding ``host:port`` fails now (None: it does not). Binds and closes a socket
    like the servers do (SO_REUSEADDR), without listening."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r} ({exc.strerror})"
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                return describe(exc)
    return None
