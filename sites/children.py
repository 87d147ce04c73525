"""Child processes of a site agent (a target daemon, capture agents), supervised: started
with the agent's death signal (a killed agent leaves no export accepting writes behind),
restarted with backoff when they exit on their own, stopped by signal and PID."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

from drctl.lifecycle import PARENT_ENV

log = logging.getLogger(__name__)

DRCTL = [sys.executable, "-m", "drctl"]


class Child:
    """One supervised process. ``start()`` spawns it and keeps it running (restart with
    exponential backoff, 1 s to 30 s) until ``stop()``."""

    def __init__(self, name: str, args: list[str], log_path: str) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None
        self.state = "stopped"  # what the heartbeat reports
        self.restarts = 0
        self._wanted = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def start(self) -> None:
        if self.task is None or self.task.done():
            self._wanted = True
            self.task = asyncio.create_task(self._supervise(), name=f"child-{self.name}")

    async def _supervise(self) -> None:
        backoff = 1.0
        while self._wanted:
            os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
            out = open(self.log_path, "ab")
            try:
                # drctl asks for SIGKILL when this agent dies (drctl/lifecycle.py)
                env = {**os.environ, PARENT_ENV: str(os.getpid())}
                self.proc = await asyncio.create_subprocess_exec(
                    *self.args, stdout=out, stderr=out, env=env)
            finally:
                out.close()
            if not self._wanted:  # stopped while it was being spawned: it must not run
                self.proc.kill()
                await self.proc.wait()
                break
            started = time.monotonic()
            self.state = "running"
            log.info("%s started (pid %d)", self.name, self.proc.pid)
            code = await self.proc.wait()
            if not self._wanted:
                break
            if time.monotonic() - started > 60:
                backoff = 1.0
            self.restarts += 1
            self.state = f"restarting in {backoff:.0f}s: exited with {code}"
            log.error("%s exited with %s: restarting in %.0fs (log: %s)", self.name, code,
                      backoff, self.log_path)
            await self._pause(backoff)
            backoff = min(30.0, backoff * 2)
        self.state = "stopped"

    async def _pause(self, seconds: float) -> None:
        """The backoff before a restart, cut short by stop()."""
        deadline = time.monotonic() + seconds
        while self._wanted and time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, deadline - time.monotonic()))

    def send(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop it (``sig``, then SIGKILL after ``timeout``) and stop supervising it."""
        self._wanted = False
        if self.running:
            assert self.proc is not None
            self.send(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.send(signal.SIGKILL)
                await self.proc.wait()
        if self.task is not None:
            # Not cancelled mid-spawn (the new process would escape): the supervisor sees
            # _wanted False after the spawn and kills it; only its backoff sleep is cut short.
            done, _ = await asyncio.wait({self.task}, timeout=timeout)
            if not done:
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.task
            if self.running:
                assert self.proc is not None
                self.send(signal.SIGKILL)
                await self.proc.wait()
            self.task = None
        self.state = "stopped"
