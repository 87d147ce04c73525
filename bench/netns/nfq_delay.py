"""netem stand-in for kernels without sch_netem: delay packets held in an NFQUEUE.

Adapted from the environment check's script. Run INSIDE the namespace whose packets are
queued (NFQUEUE is per network namespace), with the rule on the RECEIVING side (INPUT):
packets held in the sender's OUTPUT chain still count against TCP Small Queues and throttle
TCP to ~0.6 Mbit/s at 100 ms RTT.

    ip netns exec NS iptables -A INPUT -s PEER -j NFQUEUE --queue-num 7 --queue-bypass
    ip netns exec NS python nfq_delay.py 7 40 [MAX_SECONDS]

Needs the NetfilterQueue package (apt-get install libnetfilter-queue-dev; pip install
NetfilterQueue). Verdicts are issued later from the asyncio loop (a delayed accept);
COPY_META avoids copying payloads (GSO super-packets on veth would not fit a 4 KiB buffer).
Bounded: exits after MAX_SECONDS (default 900) or on SIGTERM, then unbinds (with
--queue-bypass the kernel then lets packets through undelayed).
"""

from __future__ import annotations

import asyncio
import signal
import sys

from netfilterqueue import COPY_META, NetfilterQueue


async def main(qnum: int, delay: float, max_s: float) -> None:
    loop = asyncio.get_running_loop()
    nfq = NetfilterQueue()
    queued = 0

    def on_packet(pkt: object) -> None:
        nonlocal queued
        queued += 1
        loop.call_later(delay, pkt.accept)  # type: ignore[attr-defined]

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
    print(f"nfq_delay: done, {queued} packets delayed", flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]) / 1000.0,
                     float(sys.argv[3]) if len(sys.argv) > 3 else 900.0))
