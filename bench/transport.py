"""Benchmark: what one message and its acknowledgement cost over gRPC against a raw stream.

The replication ships every consistency point as one message on a gRPC (grpc.aio) bidi
stream and the target answers each commit with an ack. This measures that exchange alone,
between two processes on loopback, with nothing else running: a client writes a message of
``--size`` random bytes and waits for an 8-byte answer, ``--count`` times; the server
answers each message as it arrives. Once over grpc.aio (plaintext, the replication's channel
options) and once over an asyncio stream with a 4-byte length prefix (the baseline: the
least a framed stream can cost in Python), alternated ``--rounds`` times. Printed per round
trip: wall time, the client's CPU and the server's CPU (user + system, the whole process,
from /proc), and gRPC's cost as a ratio of the raw stream's.

Run: python bench/transport.py [--size 49152] [--count 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import struct
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import free_port

OPTIONS = [("grpc.max_receive_message_length", 16 << 20),
           ("grpc.max_send_message_length", 16 << 20), ("grpc.http2.max_frame_size", 4 << 20)]
_LEN = struct.Struct(">I")


def _same(b: bytes) -> bytes:
    return b


def _grpc_server(port: int, ready: Any) -> None:
    import grpc

    async def main() -> None:
        async def push(requests: Any, _context: Any) -> Any:
            async for m in requests:
                yield m[:8]

        handler = grpc.method_handlers_generic_handler("bench.T", {
            "Push": grpc.stream_stream_rpc_method_handler(push, _same, _same)})
        server = grpc.aio.server(options=OPTIONS)
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def _raw_server(port: int, ready: Any) -> None:
    async def main() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while True:
                    (n,) = _LEN.unpack(await r.readexactly(4))
                    m = await r.readexactly(n)
                    w.write(_LEN.pack(8) + m[:8])
            except asyncio.IncompleteReadError:
                w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", port)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


async def _grpc_client(port: int, size: int, count: int) -> tuple[float, float]:
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as ch:
        call = ch.stream_stream("/bench.T/Push", request_serializer=_same,
                                response_deserializer=_same)()
        msg = os.urandom(size)
        await call.write(msg)
        await call.read()  # connected and warm
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            await call.write(msg)
            await call.read()
        out = time.perf_counter() - wall, time.process_time() - cpu
        await call.done_writing()
        return out


async def _raw_client(port: int, size: int, count: int) -> tuple[float, float]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    msg, head = os.urandom(size), _LEN.pack(size)

    async def one() -> None:
        w.writelines((head, msg))
        await w.drain()
        (n,) = _LEN.unpack(await r.readexactly(4))
        await r.readexactly(n)

    await one()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        await one()
    out = time.perf_counter() - wall, time.process_time() - cpu
    w.close()
    return out


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, size: int, count: int) -> dict[str, float]:
    """One run: the server in a process of its own (spawned: gRPC does not survive a fork),
    the client here, each in a fresh event loop."""
    ctx = mp.get_context("spawn")
    port, ready = free_port(), ctx.Event()
    server = ctx.Process(target=_grpc_server if kind == "grpc" else _raw_server,
                         args=(port, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise SystemExit(f"the {kind} server did not start")
        assert server.pid is not None
        before = _cpu(server.pid)
        client = _grpc_client if kind == "grpc" else _raw_client
        wall, cpu = asyncio.run(client(port, size, count))
        server_cpu = _cpu(server.pid) - before
    finally:
        server.terminate()
        server.join(10)
    return {"wall_us": wall / count * 1e6, "client_cpu_us": cpu / count * 1e6,
            "server_cpu_us": server_cpu / count * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size", type=int, default=48 << 10, help="bytes per message")
    ap.add_argument("--count", type=int, default=2000, help="round trips per run")
    ap.add_argument("--rounds", type=int, default=2, help="gRPC and raw runs, alternated")
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} load {os.getloadavg()[0]:.2f}; "
          f"{args.size} bytes x {args.count} round trips per run", flush=True)
    print("| round | transport | wall µs | client CPU µs | server CPU µs | CPU vs raw |")
    print("|---|---|---|---|---|---|")
    for r in range(1, args.rounds + 1):
        got = {kind: measure(kind, args.size, args.count) for kind in ("grpc", "raw")}
        raw_cpu = got["raw"]["client_cpu_us"] + got["raw"]["server_cpu_us"]
        for kind, m in got.items():
            both = m["client_cpu_us"] + m["server_cpu_us"]
            print(f"| {r} | {kind} | {m['wall_us']:,.0f} | {m['client_cpu_us']:,.0f} | "
                  f"{m['server_cpu_us']:,.0f} | {both / raw_cpu:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
