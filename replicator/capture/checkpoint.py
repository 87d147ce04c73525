"""The capture agent's activity-log checkpoints (activity.py), on a thread of their own.

Each member's log lists the extents where its volume (written by the NBD export) or its view
(written by the planner) may differ from what the last checkpoint made durable. A checkpoint,
once a log is due (``ActivityLog.due``), for all the members at once:

1. begins a new list in every log, under the journal's ``order`` lock: no export write is
   between its ``ensure`` and its volume write then (the planner pins what it changes);
2. syncs the journal (a write whose record was not durable yet may be on the volume's disk
   after the next step: the journal's replay must then list it), the volumes and the views;
3. ends it: each log now lists only what changed since step 1.

The thread starts once the agent is protected: before that, the extents an earlier crash of
the machine left in the logs are still to be compared by the first resync (capture/resume.py)
and must stay listed. ``close`` stops it and syncs the journal once more (a clean stop then
checkpoints each log with the volume and the view synced: source_state.py), then closes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable

from replicator.activity import ActivityLog
from replicator.capture.nbdio import NbdExport
from replicator.driver import PushDriver

log = logging.getLogger(__name__)
CLOSE_WAIT = 120  # seconds

POLL_SECONDS = 1.0


class Checkpointer:
    def __init__(self, drivers: list[PushDriver], exports: list[NbdExport]) -> None:
        """The exports' writes are listed in their drivers' logs from now on."""
        for e, d in zip(exports, drivers, strict=True):
            e.activity = d.store.al
        self.stores = [d.store for d in drivers if d.store.al is not None]
        self.journal = exports[0].journal
        self.fds = [e.fd for e in exports]
        self.count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = ""
        self._gave_up = False  # close() stopped waiting for a checkpoint (a hung disk)

    def _logs(self) -> list[ActivityLog]:
        return [s.al for s in self.stores if s.al is not None]

    def follow(self, inner: Callable[[bool], None] | None) -> Callable[[bool], None]:
        """A protection hook that starts the thread the first time the agent is protected,
        then calls ``inner``."""
        def protected(on: bool) -> None:
            if on:
                self.start()
            if inner is not None:
                inner(on)

        return protected

    def start(self) -> None:
        if self._thread is None and self.stores:
            self._thread = threading.Thread(target=self._run, name="al-checkpoint",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            if not any(al.due() for al in self._logs()):
                continue
            try:
                self.run_once()
                if self._failing:
                    log.info("activity log checkpoints succeed again")
                self._failing = ""
            except Exception as exc:  # the volumes stay served; tried again at the next poll
                # (while it fails, the logs keep listing more than they must: never less)
                if str(exc) != self._failing:
                    log.error("activity log checkpoint failed: %s (retrying)", exc)
                self._failing = str(exc)

    def run_once(self) -> None:
        logs = self._logs()
        with self.journal.order:
            began = [al.begin_checkpoint() for al in logs]
        self.journal.sync(periodic=True)
        for fd in self.fds:
            os.fdatasync(fd)
        for store in self.stores:
            store.sync_view()
        if self._stop.is_set() and self._gave_up:
            return  # close() went on without it: what it synced may be closed (or reused)
        for al, b in zip(logs, began, strict=True):
            al.end_checkpoint(b)
        self.count += 1

    def close(self) -> None:
        """Stop the thread; the journal synced once more, then closed (before the exports:
        the capture loop's end)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(CLOSE_WAIT)  # a checkpoint is a few syncs: the journal is
            if self._thread.is_alive():  # closed after it (a disk that hangs: not forever)
                self._gave_up = True
                log.error("the activity-log checkpoint did not finish within %d s (the disk "
                          "does not answer): stopping without it; the next start checks "
                          "everything the log lists (the stop itself may wait for the disk "
                          "again)", CLOSE_WAIT)
        with contextlib.suppress(OSError, ValueError):
            self.journal.sync()
        self.journal.close()
