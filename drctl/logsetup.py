"""Logging for every drctl daemon: records go through a queue so log I/O never blocks the loop.

Levels: DEBUG per-batch detail; INFO lifecycle and one line per operation; WARNING a retry or a
rejected batch that the system handles; ERROR something an operator must look at.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Held while a line goes to the console: a progress bar draws under it too, and is cleared
# (``before_each_line``) before a log line is written, so the two never share a line.
CONSOLE_LOCK = threading.RLock()
_BEFORE_LINE: list[Callable[[], None]] = []


class _Console(logging.StreamHandler):  # type: ignore[type-arg]
    def emit(self, record: logging.LogRecord) -> None:
        with CONSOLE_LOCK:
            for fn in list(_BEFORE_LINE):
                fn()
            super().emit(record)


@contextmanager
def before_each_line(fn: Callable[[], None]) -> Iterator[None]:
    """While inside: ``fn`` runs (under CONSOLE_LOCK) before each log line is written."""
    _BEFORE_LINE.append(fn)
    try:
        yield
    finally:
        _BEFORE_LINE.remove(fn)


def setup_logging(level: str = "WARNING") -> None:
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = _Console(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    listener = logging.handlers.QueueListener(q, handler)
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(q)]
    root.setLevel(level.upper())
    listener.start()
    atexit.register(listener.stop)
