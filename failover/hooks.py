"""Site hooks: operator-supplied commands run on role changes outside an operation (an
operation's steps are run one by one and recorded: failover/agent.py ``run_operation``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from failover.steprun import run_step
from failover.steps import StepSpec

log = logging.getLogger(__name__)


async def run_hooks(label: str, steps: Iterable[StepSpec], env: dict[str, str],
                    secrets: Iterable[str] = ()) -> bool:
    """Run ``steps`` (hooks, health checks) in order with DRCTL_* variables, each with its
    own timeout (killed past it); True when every one succeeded (stops at the first that
    did not)."""
    for step in steps:
        got = await run_step(step, {**env, "DRCTL_STEP": step.name}, secrets)
        if got.status != "done":
            log.error("%s hook %s failed (%s): %s", label, step.name, got.error, got.output)
            return False
        log.info("%s hook %s ok (%.1fs)", label, step.name, got.seconds)
    return True
