"""Site hooks: operator-supplied shell commands run on role changes, with a timeout."""

from __future__ import annotations

import logging

from drctl.shell import ShellError, run_shell

log = logging.getLogger(__name__)


async def run_hook(name: str, command: str | None, env: dict[str, str],
                   timeout: float = 60.0) -> bool:
    """Run ``command`` (if any) with DRCTL_* variables; True on exit status 0."""
    if not command:
        return True
    try:
        await run_shell(command, env, timeout)
    except TimeoutError:
        log.error("hook %s timed out after %.0fs: %s", name, timeout, command)
        return False
    except ShellError as exc:
        log.error("hook %s failed (%s)", name, exc)
        return False
    log.info("hook %s ok", name)
    return True
