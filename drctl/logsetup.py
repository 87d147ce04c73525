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


def setup_logging(level: str = "WARNING") -> None:
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    listener = logging.handlers.QueueListener(q, handler)
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(q)]
    root.setLevel(level.upper())
    listener.start()
    atexit.register(listener.stop)
