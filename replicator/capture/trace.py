"""Optional per-point stage timestamps of the capture path (for finding where lag comes from).

Off unless ``DRCTL_CP_TRACE`` names a file: then the agent appends one JSON line per
consistency point once the target acknowledged it, with monotonic timestamps (seconds):

* ``write``: its oldest write was journaled (the lag clock starts here)
* ``durable``: the group commit that made that write durable finished (the client's reply)
* ``cut``: the point was closed (a cut by the agent, or a client FLUSH: ``flush`` true)
* ``extracted``: its blocks were read back from the journal and handed to the planner
* ``planned``: its closing batch was sealed (planner thread)
* ``sent``: its closing batch was handed to the stream (after the token bucket and window)
* ``acked``: the ack covering it arrived (every member of a group)
* ``released``: it left the journal; ``lag`` = released - write

plus ``blocks`` (in the point) and ``inflight`` (points cut and not yet acknowledged when it
was cut). The cost when off is one attribute test per stage.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from typing import IO

ENV = "DRCTL_CP_TRACE"
STAGES = ("write", "durable", "cut", "extracted", "planned", "sent", "acked", "released")


class PointTrace:
    def __init__(self, path: str | None = None) -> None:
        path = path if path is not None else os.environ.get(ENV) or None
        self.enabled = path is not None
        # line-buffered: a reader sees every acknowledged point at once
        self._out: IO[str] | None = open(path, "a", buffering=1) if path else None
        self._points: dict[int, dict[str, float]] = {}
        # (started, finished) of the journal's recent group commits, for ``durable``
        self.syncs: deque[tuple[float, float]] = deque(maxlen=4096)

    def stamp(self, cp: int, stage: str, at: float | None = None) -> None:
        if self.enabled:
            self._points.setdefault(cp, {})[stage] = time.monotonic() if at is None else at

    def note(self, cp: int, key: str, value: float) -> None:
        if self.enabled:
            self._points.setdefault(cp, {})[key] = value

    def opened(self, cp: int, first_at_wall: float, flush: bool) -> None:
        """The point's oldest write (wall clock, as the journal keeps it) and how it closed."""
        if not self.enabled:
            return
        now_mono, now_wall = time.monotonic(), time.time()
        p = self._points.setdefault(cp, {})
        p["cut"] = p.get("cut", now_mono)
        if first_at_wall:
            p["write"] = now_mono - (now_wall - first_at_wall)
        p["flush"] = float(flush)

    def synced(self, started: float, finished: float) -> None:
        if self.enabled:
            self.syncs.append((started, finished))

    def released(self, cp: int) -> None:
        if not self.enabled:
            return
        p = self._points.pop(cp, None)
        if p is None:
            return
        p["released"] = time.monotonic()
        if "write" in p:
            # the first group commit started after the write made it durable; points are
            # released in write order, so older syncs serve no later point
            syncs = self.syncs
            while syncs and syncs[0][0] < p["write"]:
                syncs.popleft()
            if syncs:
                p["durable"] = syncs[0][1]
            p["lag"] = p["released"] - p["write"]
        assert self._out is not None
        self._out.write(json.dumps({"cp": cp, **{k: round(v, 6) for k, v in p.items()}}) + "\n")

    def forget(self) -> None:
        """Points that will not be acknowledged on this stream (a failure): drop them."""
        self._points.clear()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
            self.enabled = False
