"""The NBD export's write path after the event loop: the ordered writer and the group commit.

``OrderedWriter``: writes, trims and flushes are journaled and written to the volume in the
order they arrived (so the journal replays to exactly the volume's content), each under the
journal's ``order`` lock (from its record's append to its volume write). A small one is done
on the event loop while nothing waits on the writer's thread; a large one (or any while
something waits there) on that thread, so that copying a large write into the journal and
the volume does not hold up the other requests; the thread then hands it to the group
commit itself, without going back through the loop.

``GroupCommit``: many concurrent writers, one fdatasync of the journal, on a thread of its
own that sleeps until a request waits. A sync makes durable every record appended before it
started: it reads the journal's record clock first, under the ``order`` lock (in bitmap mode
the volume holds the data and is synced too, so a record counts only once its volume write
is made). When it ends, the callbacks of the requests it covered run on the event loop in
one go (one wake-up of the loop for the whole group, no task per request). A sync that
starts with nothing new to cover is not made. (A lone request, one at a time, is not synced
on the loop itself, although that saves two thread wake-ups: the loop ships nothing while it
waits for the disk, and the replication lag's tail grew several-fold in bench/capture.py.)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable

from replicator.capture.journal import ChangeJournal

log = logging.getLogger(__name__)

Done = Callable[[BaseException | None], None]  # called on the loop: None once durable


class GroupCommit:
    def __init__(self, journal: ChangeJournal) -> None:
        self.journal = journal
        self.synced = 0  # every record up to this number is durable (the sync thread's)
        self.on_sync: Callable[[float, float], None] | None = None  # (started, finished)
        self.delivering = False  # the callbacks of a sync are running (loop)
        self._after: list[Callable[[], None]] = []
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, Done]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._loop_thread = 0
        self._syncing = False  # the thread is syncing (it looks for new waiters after)
        self._closed = False

    @property
    def durable(self) -> int:
        return self.synced

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the sync thread (once), delivering to ``loop``."""
        with self._cond:
            if self._thread is not None or self._closed:
                return
            self._loop = loop
            self._loop_thread = threading.get_ident()
            self._thread = threading.Thread(target=self._run, name="journal-sync", daemon=True)
            self._thread.start()

    def when_durable(self, upto: int, done: Done) -> None:
        """``done(None)`` on the loop once every record up to number ``upto`` is durable, or
        ``done(error)`` if the sync failed. Any thread may ask (``start`` first); on the
        loop's own thread a record that is durable already is answered at once."""
        if upto <= self.synced and threading.get_ident() == self._loop_thread:
            done(None)
            return
        with self._cond:
            if self._closed:
                return  # the export is closing: its connections are gone, nobody to answer
            self._waiting.append((upto, done))
            if len(self._waiting) == 1 and not self._syncing:  # else it is awake already,
                self._cond.notify()  # or looks again once its sync ends

    async def wait_durable(self, upto: int) -> None:
        """The coroutine form of :meth:`when_durable` (raises the sync's error)."""
        loop = asyncio.get_running_loop()
        self.start(loop)
        fut: asyncio.Future[None] = loop.create_future()

        def done(err: BaseException | None) -> None:
            if not fut.done():
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)

        self.when_durable(upto, done)
        await fut

    def close(self) -> None:
        """Stop the sync thread (after a sync it is running); waiters are dropped."""
        with self._cond:
            self._closed = True
            self._waiting.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)

    def _run(self) -> None:
        while True:
            with self._cond:
                while (not self._waiting or self._syncing) and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch, self._waiting = self._waiting, []
                self._syncing = True
            err: BaseException | None = None
            started = finished = 0.0
            if any(n > self.synced for n, _done in batch):
                with self.journal.order:  # appended (and written) before the sync: covered
                    target = self.journal.seq
                started = time.monotonic()
                try:
                    self.journal.sync(target)
                    self.synced = max(self.synced, target)
                except OSError as exc:
                    log.error("journal sync failed: %s", exc)
                    err = exc
                finished = time.monotonic()
            with self._cond:
                self._syncing = False
            loop = self._loop
            assert loop is not None
            try:
                loop.call_soon_threadsafe(self._deliver, batch, err, started, finished)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _deliver(self, batch: list[tuple[int, Done]], err: BaseException | None,
                 started: float, finished: float) -> None:
        if started and self.on_sync is not None:
            self.on_sync(started, finished)
        self.delivering = True
        try:
            for _n, done in batch:
                done(err)
        finally:
            self.delivering = False
            after, self._after = self._after, []
            for fn in after:
                fn()

    def after_delivery(self, fn: Callable[[], None]) -> None:
        """While the callbacks of a sync run: call ``fn`` once they all have (a connection
        writes the replies of the whole group at once)."""
        self._after.append(fn)


class OrderedWriter:
    """Runs journal-and-volume jobs in the order they were submitted: inline while nothing
    is queued (``idle``), otherwise on a thread of its own; each under ``lock`` (the
    journal's ``order``)."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self._q: queue.SimpleQueue[tuple[Callable[[], int], Callable[[int | Exception], None]]
                                  | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0
        self._thread: threading.Thread | None = None

    @property
    def idle(self) -> bool:
        """Every job submitted so far has been done (its journal record and volume write are
        made): a job done inline now comes after them."""
        return self._queued == 0

    def run(self, job: Callable[[], int]) -> int:
        """Run ``job`` here (only while ``idle``: after every job submitted before)."""
        with self.lock:
            return job()

    def submit(self, job: Callable[[], int], then: Callable[[int | Exception], None]) -> None:
        """Run ``job`` on the writer's thread after the jobs before it, then ``then`` with its
        result (on that thread; an error is passed, not raised)."""
        with self._lock:
            self._queued += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nbd-writer",
                                                daemon=True)
                self._thread.start()
        self._q.put((job, then))

    def close(self) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None:
            self._q.put(None)
            if thread is not threading.current_thread():
                thread.join(10)
            with self._lock:
                self._thread = None

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            job, then = item
            result: int | Exception
            try:
                with self.lock:
                    result = job()
            except OSError as exc:
                result = exc
            except Exception as exc:  # a bug: answered as an I/O error, the thread goes on
                log.exception("nbd: write job failed")
                result = exc
            with self._lock:
                self._queued -= 1  # after the job's writes: the loop may go inline again
            then(result)
