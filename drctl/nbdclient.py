"""A minimal synchronous NBD client (the demo's application writer and the tests): newstyle
fixed handshake, optionally NBD_OPT_STARTTLS first (``tls``: a client context), OPT_GO,
simple replies.
It issues one request at a time, so the caller knows exactly which writes were acknowledged.
"""

from __future__ import annotations

import socket
import ssl
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_STARTTLS, OPT_GO, REP_ACK = 5, 7, 1
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6


class NbdError(Exception):
    pass


class NbdClient:
    def __init__(self, host: str, port: int, export: str, timeout: float = 30.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        self.handle = 0
        try:
            self._handshake(export, tls, host)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, export: str, tls: ssl.SSLContext | None = None,
                   host: str | None = None) -> None:
        magic, opt, _flags = struct.unpack(">QQH", self._read(18))
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise NbdError("not a newstyle NBD server")
        self.sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        if tls is not None:
            self._option(OPT_STARTTLS, b"")
            self.sock = tls.wrap_socket(self.sock, server_hostname=host)
        name = export.encode()
        self.size = 0
        for rtype, body in self._option(OPT_GO, struct.pack(">I", len(name)) + name
                                        + struct.pack(">H", 0)):
            if rtype == 3 and struct.unpack(">H", body[:2])[0] == 0:
                self.size = struct.unpack(">Q", body[2:10])[0]

    def _option(self, opt: int, data: bytes) -> list[tuple[int, bytes]]:
        """Send an option; its replies up to the ACK (an error reply raises NbdError)."""
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        out: list[tuple[int, bytes]] = []
        while True:
            _m, _o, rtype, length = struct.unpack(">QIII", self._read(20))
            body = self._read(length)
            if rtype == REP_ACK:
                return out
            if rtype & (1 << 31):
                raise NbdError(f"option {opt} refused: {rtype:#x} "
                               f"{body.decode(errors='replace')!r}")
            out.append((rtype, body))

    def _read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("NBD server closed the connection")
            out += chunk
        return bytes(out)

    def _request(self, cmd: int, offset: int, length: int, data: bytes = b"") -> bytes:
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self.handle, offset,
                                      length) + data)
        magic, error, handle = struct.unpack(">IIQ", self._read(16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self.handle:
            raise NbdError("bad reply")
        if error:
            raise NbdError(f"request {cmd} at {offset}+{length} failed: errno {error}")
        return self._read(length) if cmd == CMD_READ else b""

    def write(self, offset: int, data: bytes) -> None:
        self._request(CMD_WRITE, offset, len(data), data)

    def read(self, offset: int, length: int) -> bytes:
        return self._request(CMD_READ, offset, length)

    def flush(self) -> None:
        self._request(CMD_FLUSH, 0, 0)

    def zero(self, offset: int, length: int) -> None:
        self._request(CMD_WRITE_ZEROES, offset, length)

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()
