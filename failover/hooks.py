"""Site hooks: operator-supplied shell commands run on role changes, with a timeout."""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger(__name__)


async def run_hook(name: str, command: str | None, env: dict[str, str],
                   timeout: float = 60.0) -> bool:
    """Run ``command`` (if any) with DRCTL_* variables; True on exit status 0."""
    if not command:
        return True
    proc = await asyncio.create_subprocess_shell(
        command, env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.error("hook %s timed out after %.0fs: %s", name, timeout, command)
        return False
    if proc.returncode != 0:
        log.error("hook %s failed (exit %s): %s", name, proc.returncode,
                  out.decode(errors="replace")[-500:])
        return False
    log.info("hook %s ok", name)
    return True
