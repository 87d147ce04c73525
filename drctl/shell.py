"""Running operator-supplied shell commands (hooks, health checks) from asyncio.

Each command runs in a session of its own, so a timeout kills everything it started (a hook
``sleep 600; ...`` leaves no ``sleep`` behind), and what it printed until then is kept."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

_KEEP = 64 * 1024  # bytes of output kept (the end: where the reason usually is)


class ShellError(RuntimeError):
    """The command exited non-zero; ``output`` is the end of what it printed."""

    def __init__(self, returncode: int, output: str) -> None:
        super().__init__(f"exit {returncode}: {output[-300:]}")
        self.returncode = returncode
        self.output = output


class ShellTimeout(TimeoutError):
    """The command outlasted its timeout and was killed (its whole process group)."""

    def __init__(self, timeout: float, output: str) -> None:
        super().__init__(f"timed out after {timeout:g}s: killed")
        self.timeout = timeout
        self.output = output


async def run_shell(command: str, env: dict[str, str], timeout: float) -> str:
    """Run ``command`` with ``env`` added; return its output (stdout and stderr), or raise
    ShellError (non-zero exit) or ShellTimeout (a TimeoutError: the process group is killed)."""
    proc = await asyncio.create_subprocess_shell(
        command, env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    out = bytearray()

    async def read() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            out.extend(chunk)
            del out[:-_KEEP]
        await proc.wait()

    try:
        await asyncio.wait_for(read(), timeout)
    except BaseException as exc:  # the timeout, or our own cancellation: nothing may linger
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        if isinstance(exc, TimeoutError):
            raise ShellTimeout(timeout, out.decode(errors="replace")) from None
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise ShellError(proc.returncode or 0, text)
    return text
