"""A service's history entries and the requests made of an operation under way (who asked
for a retry, a cancel, a failover overtaking a switchover's drain)."""

from __future__ import annotations

from dataclasses import asdict

from failover.fsm import Command, Decision, State
from failover.records import CommandRecord, Operation, Request

FAILOVERS = (Command.FAILOVER, Command.FORCE_FAILOVER)


def history_step(d: Decision, op: Operation | None, later: Request | None,
                  now: float) -> dict[str, object]:
    """The history's entry of a move: the operation it belongs to (which one: failover or
    switchover, failback included; a failed resync; where to, whether anyone asked and who)
    and the request that made it if one was asked of the operation under way (a retry, a
    cancel, a failover overtaking the drain)."""
    step: dict[str, object] = {"at": now, "from": d.state, "to": d.next_state,
                               "action": d.action}
    if op is not None:
        step["operation"] = {"kind": op.kind, "target": op.target, "automatic": op.automatic,
                             "asked_by": asdict(op.asked_by) if op.asked_by else None,
                             "request_id": op.request_id}
    if later is not None:
        step["request"] = asdict(later)
    return step


def later_request(d: Decision, cmd: CommandRecord | None) -> Request | None:
    """The request that made this move of an operation already under way (a retry or a
    cancel of a failed one, a failover overtaking a switchover's drain), with who asked."""
    if cmd is None or not d.changes:
        return None
    if d.state is State.FAILED or (d.state is State.DRAINING and d.next_state is State.FENCING
                                   and cmd.command in FAILOVERS):
        return Request(cmd.command.value, cmd.by, cmd.at, cmd.id)
    return None


def note_request(op: Operation | None, request: Request | None) -> None:
    """Keep ``request`` in the operation (the last few)."""
    if op is not None and request is not None:
        op.later_requests = [*op.later_requests, request][-5:]
