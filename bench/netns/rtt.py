"""Application-level TCP round trip between two namespaces (ping's kernel timestamps come
before an NFQUEUE delay in INPUT, so they under-report it).

    python rtt.py echo BIND_IP PORT [MAX_SECONDS]   echoes one connection, then exits
    python rtt.py ping DEST_IP PORT [COUNT]         prints {"min_ms", "median_ms", "max_ms"}
"""

from __future__ import annotations

import json
import socket
import sys
import time


def echo(ip: str, port: int, max_s: float) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((ip, port))
    ls.listen(1)
    ls.settimeout(max_s)
    conn, _ = ls.accept()
    conn.settimeout(max_s)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while b := conn.recv(64):
        conn.sendall(b)


def ping(ip: str, port: int, count: int) -> None:
    s = None
    for _ in range(50):
        try:
            s = socket.create_connection((ip, port), timeout=5)
            break
        except OSError:
            time.sleep(0.1)
    if s is None:
        raise SystemExit(f"rtt: cannot connect to {ip}:{port}")
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(count):
        t = time.perf_counter()
        s.sendall(b"x")
        s.recv(64)
        rtts.append((time.perf_counter() - t) * 1000)
    s.close()
    rtts.sort()
    print(json.dumps({"count": count, "min_ms": round(rtts[0], 2),
                      "median_ms": round(rtts[len(rtts) // 2], 2),
                      "max_ms": round(rtts[-1], 2)}))


if __name__ == "__main__":
    mode, addr, p = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "echo":
        echo(addr, p, float(sys.argv[4]) if len(sys.argv) > 4 else 30.0)
    else:
        ping(addr, p, int(sys.argv[4]) if len(sys.argv) > 4 else 10)
