"""netem stand-in for kernels without sch_netem: delay packets held in an NFQUEUE.

Adapted from the environment check's script. Run INSIDE the namespace whose packets are
queued (NFQUEUE is per network namespace), with the rule on the RECEIVING side (INPUT):
packets held in the sender's OUTPUT chain still count against TCP Small Queues and throttle
TCP to ~0.6 Mbit/s at 100 ms RTT.

    ip netns exec NS iptables -A INPUT -s PEER -j NFQUEUE --queue-num 7 --queue-bypass
    ip netns exec NS python nfq_delay.py 7 40 [MAX_SECONDS]

Needs the NetfilterQueue package (apt-get install libnetfilter-queue-dev; pip install
NetfilterQueue). Verdicts are issued later from the asyncio loop (a delayed accept, in
arrival order: a FIFO released by one timer);
COPY_META avoids copying payloads (GSO super-packets on veth would not fit a 4 KiB buffer).
Bounded: exits after MAX_SECONDS (default 900) or on SIGTERM, then unbinds (with
--queue-bypass the kernel then lets packets through undelayed).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections import deque
from typing import Any

from netfilterqueue import COPY_META, NetfilterQueue

LATE_MS = (1, 5, 10, 20, 50, 100)  # lateness buckets of the report at exit


async def main(qnum: int, delay: float, max_s: float) -> None:
    loop = asyncio.get_running_loop()
    nfq = NetfilterQueue()
    queued = 0
    # A delay line keeps the order of its packets. One timer per packet (call_later) did
    # not: timers due at the same instant leave asyncio's heap in any order, and the
    # receiver saw segments out of order (TcpExtTCPOFOQueue), the sender spurious loss
    # probes (TCPLossProbes answered by DSACKs) and a congestion window cut for nothing.
    pending: deque[tuple[float, Any]] = deque()
    timer: asyncio.TimerHandle | None = None
    lateness = [0] * (len(LATE_MS) + 1)  # packets by how late they left: <= 1 ms, > 1 ms, ...
    waited = [0] * (len(LATE_MS) + 1)  # by how long they waited in the kernel to be read

    def release() -> None:
        nonlocal timer
        timer = None
        now = loop.time()
        while pending and pending[0][0] <= now:
            due, pkt = pending.popleft()
            pkt.accept()
            late = now - due
            lateness[sum(late * 1000 > m for m in LATE_MS)] += 1
        if pending:
            timer = loop.call_at(pending[0][0], release)

    def on_packet(pkt: Any) -> None:
        nonlocal queued, timer
        queued += 1
        stamp = pkt.get_timestamp()
        if stamp:
            waited[sum((time.time() - stamp) * 1000 > m for m in LATE_MS)] += 1
        pending.append((loop.time() + delay, pkt))
        if timer is None:
            timer = loop.call_at(pending[0][0], release)

    nfq.bind(qnum, on_packet, max_len=100000, mode=COPY_META)
    loop.add_reader(nfq.get_fd(), nfq.run, False)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"nfq_delay: queue {qnum} delay {delay * 1000:.0f} ms", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), max_s)
    except TimeoutError:
        pass
    await asyncio.sleep(delay * 2)  # let the pending delayed verdicts go out
    loop.remove_reader(nfq.get_fd())
    nfq.unbind()
    late = ", ".join(f"> {m} ms: {n}" for m, n in zip(LATE_MS, lateness[1:], strict=True) if n)
    seen = ", ".join(f"> {m} ms: {n}" for m, n in zip(LATE_MS, waited[1:], strict=True) if n)
    print(f"nfq_delay: done, {queued} packets delayed; released late {late or 'never'}; "
          f"read late {seen or 'never'} ({sum(waited)} with a time stamp)", flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]) / 1000.0,
                     float(sys.argv[3]) if len(sys.argv) > 3 else 900.0))
