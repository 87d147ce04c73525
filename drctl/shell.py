"""Running operator-supplied shell commands (hooks, health checks) from asyncio."""

from __future__ import annotations

import asyncio
import os


class ShellError(RuntimeError):
    pass


async def run_shell(command: str, env: dict[str, str], timeout: float) -> str:
    """Run ``command`` with ``env`` added; return its output, or raise ShellError (non-zero
    exit, with the output's tail) or TimeoutError (the process is killed)."""
    proc = await asyncio.create_subprocess_shell(
        command, env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise ShellError(f"exit {proc.returncode}: {text[-300:]}")
    return text
