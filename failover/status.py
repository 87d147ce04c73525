"""One status view of a cluster, built from one etcd snapshot: what `drctl status` prints and
what `GET /api/v1/status` returns (the API adds DNS answers and drills).

Per service, besides the record: the primary's protection report, resync progress,
unreplicated writes set aside on the replica, each site's role and data path from the
heartbeats, ``operation``: the operation in progress (else the last one) with each step's
outcome and the end of its output, and ``progress``: the lines the CLI prints and the page
shows under the service.

Who asked is said wherever a request is: ``operation.asked_by`` (the actor: name, role, via)
and ``operation.asked`` ("asked by alice (operator)", "automatic (controller c1)", "asked by
an unknown user" for a record from before requests named their user) with ``asked_at``;
each state change's operation likewise, and ``request`` on a change a later request made (a
retry, a cancel); ``pending_asked`` for a queued command."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from drctl.words import count
from failover.config import ClusterConfig
from failover.coordination.base import Snapshot
from failover.fsm import State, human, seconds
from failover.records import (
    Actor,
    CommandRecord,
    Heartbeat,
    Operation,
    Request,
    ServiceHealth,
    ServiceRecord,
    StepRun,
    asked_text,
    command_key,
    heartbeat_key,
    leader_key,
    service_record,
    state_key,
)
from failover.steps import Owner


def cluster_status(cfg: ClusterConfig, snap: Snapshot, now: float) -> dict[str, Any]:
    beats: dict[str, Heartbeat | None] = {}
    sites: dict[str, Any] = {}
    for site, s in cfg.sites.items():
        raw = snap.value(heartbeat_key(cfg.prefix, site))
        hb = beats[site] = Heartbeat.decode(raw) if raw else None
        sites[site] = {"address": s.address, "alive": hb is not None,
                       "heartbeat_age_seconds": round(now - hb.at, 2) if hb else None,
                       "services": {n: _site_view(h) for n, h in hb.services.items()}
                       if hb else {}}
    services: dict[str, Any] = {}
    for name, svc in cfg.services.items():
        rec = service_record(snap.value(state_key(cfg.prefix, name)), svc.primary, svc.replica)
        raw = snap.value(command_key(cfg.prefix, name))
        pending = CommandRecord.decode(raw) if raw else None
        health = {site: _health(beats.get(site), name) for site in (rec.primary, rec.replica)}
        serving = health[rec.primary]
        if serving is not None and serving.role != "primary":
            serving = None
        lag, stale, lag_none = shown_lag(rec, beats.get(rec.primary) is not None)
        services[name] = {
            "state": rec.state, "primary": rec.primary, "replica": rec.replica,
            "home": svc.primary,  # the runbook's primary: where a failback goes
            "epoch": rec.epoch, "lag_seconds": lag, "lag_stale": stale,
            "lag_none": lag_none,  # why there is no lag: no_copy, no_replica (null: unknown)
            # false: nothing to fail over to without --force (initial sync, resync)
            "replica_consistent": rec.replica_consistent,
            "rpo_budget_seconds": svc.policy.rpo_seconds, "message": rec.message,
            # the message without the table's alternatives (a drain: as the primary reports
            # it now; the message is the controller's from the tick that last wrote the record)
            "summary": drain_line(rec, serving) if rec.state is State.DRAINING
            else human(rec.message),
            "error": rec.operation.error if rec.operation else None,
            "failed_step": rec.operation.failed_step if rec.operation else None,
            "pending": pending.command if pending else None,
            "pending_asked": asked_text(pending.by) if pending else None,
            "dns_name": ", ".join(f"{d.record.name}.{d.record.zone}" for d in svc.dns)
            or None,
            "protected": serving.protected if serving else None,
            "barrier": serving.barrier if serving else False,
            "resync": rec.resync,
            "unreplicated_blocks": rec.unreplicated_blocks,
            "unreplicated_file": rec.unreplicated_file,
            "sites": {site: _site_view(h) if h else None for site, h in health.items()},
            "progress": progress(rec, serving, health[rec.replica],
                                 beats.get(rec.replica) is not None),
            "history": [f"{h['from']}->{h['to']}" for h in rec.history],
            # the last state changes, newest first; each with the operation it belonged to
            # (kind, target, automatic, who asked), if any, and the request that made it
            "operations": [_change(h, svc.primary) for h in reversed(rec.history[-10:])],
            "operation": (_operation(rec.operation, True, svc.primary)
                          or _operation(rec.last_operation, False, svc.primary)),
            "waiting_for": rec.waiting_for,
        }
    leader = snap.value(leader_key(cfg.prefix))
    return {"leader": leader.decode() if leader else None, "sites": sites,
            "services": services, "at": now}


# the record names the new primary and the former one as its replica, which is none yet
NO_REPLICA_STATES = frozenset({State.PROMOTING, State.REROUTING, State.FAILED_OVER})


NO_COPY = "no_copy"  # why a status shows no lag (its ``lag_none``): no consistent copy,
NO_REPLICA = "no_replica"  # or no replica


def shown_lag(rec: ServiceRecord,
              primary_alive: bool) -> tuple[float | None, bool, str | None]:
    """(the lag to show, whether it is stale, why there is none). None with a reason while
    there is no lag to speak of: the replica holds no consistent copy (NO_COPY: during an
    initial sync or a resync the primary counts only its captured writes not yet
    acknowledged, not the copy), or there is no replica (NO_REPLICA: from the promotion until
    the former primary is back; an operation that failed after the roles were swapped too).
    None without a reason: unknown (the primary has not reported one). Stale: the primary's
    site is silent (no heartbeat), and this is the last figure it reported (the one the
    controller decides with)."""
    op = rec.operation
    swapped = (rec.state is State.FAILED and op is not None and op.kind != "resync"
               and rec.primary == op.target)
    if not rec.replica_consistent:
        return None, False, NO_COPY
    if rec.state in NO_REPLICA_STATES or swapped:
        return None, False, NO_REPLICA
    lag = rec.last_lag_seconds
    return lag, lag is not None and not primary_alive, None


def lag_words(service: dict[str, Any], digits: int = 1) -> str:
    """A service's lag as ``drctl status`` (and the demo) print it, from its status:
    ``0.4s``, ``0.4s(last reported)``, ``none(no consistent copy)``, ``none(no replica)``
    or ``unknown``."""
    lag = service["lag_seconds"]
    if lag is None:
        return {NO_COPY: "none(no consistent copy)", NO_REPLICA: "none(no replica)"}.get(
            service.get("lag_none") or "", "unknown")
    return f"{lag:.{digits}f}s" + ("(last reported)" if service.get("lag_stale") else "")


def label(kind: str, target: str, home: str) -> str:
    """What an operation is called: ``failover to west``, ``resync of east``, and a
    switchover to the runbook's primary (``home``) is the ``failback to east`` it was."""
    if kind == "resync":
        return f"resync of {target}"
    if kind == "switchover" and target == home:
        return f"failback to {target}"
    return f"{kind} to {target}"


def _operation(op: Operation | None, current: bool, home: str) -> dict[str, Any] | None:
    """An operation with its steps (each: status, seconds, the end of its output, error)
    and who asked for it, and for anything asked of it since (retry, cancel)."""
    if op is None or not op.steps:
        return None
    out = {**asdict(op), "current": current, "asked": op.asked,
           "label": label(op.kind, op.target, home)}
    out["later_requests"] = [{**asdict(r), "asked": r.asked} for r in op.later_requests]
    return out


def _change(h: dict[str, Any], home: str) -> dict[str, Any]:
    """A state change of the history: its operation (and who asked for that; a change
    recorded before operations said so: unknown), and the request that made it if it was
    asked of an operation under way (``retry asked by bob (admin)``)."""
    op = h.get("operation")
    if isinstance(op, dict):
        op = {**op, "asked": asked_text(Actor.from_dict(op.get("asked_by")),
                                        bool(op.get("automatic"))),
              "label": label(str(op.get("kind")), str(op.get("target")), home)}
    request = Request.from_dict(h.get("request"))
    return {"at": h["at"], "from": h["from"], "to": h["to"], "operation": op,
            "request": request.asked if request else None,
            "request_id": request.id if request else None}


def operation_line(op: dict[str, Any], clock: Callable[[float], str] | None = None) -> str:
    """The operation of a service's status (``operation``), as `drctl status` prints it:
    ``switchover to west, asked by alice (operator) at 07:40:12; from east, started
    07:40:13: in progress`` (``clock``: seconds -> "HH:MM:SS", local time by default)."""

    def at(t: float) -> str:
        return clock(t) if clock is not None else time.strftime("%H:%M:%S", time.localtime(t))

    asked_at = op.get("asked_at")
    line = (f"{'operation' if op['current'] else 'last operation'}: {op['label']}, "
            f"{op['asked']}"
            + (f" at {at(asked_at)}" if asked_at is not None else "")
            + f"; from {op['source']}, started {at(op['started_at'])}: ")
    if op["current"]:
        line += "failed" if op.get("error") else "in progress"
    else:
        line += op.get("outcome") or "over"
    for r in op.get("later_requests") or []:
        line += f"; {r['asked']} at {at(r['at'])}"
    return line


def _health(hb: Heartbeat | None, service: str) -> ServiceHealth | None:
    return hb.services.get(service) if hb is not None else None


def _site_view(h: ServiceHealth) -> dict[str, Any]:
    return {"role": h.role, "epoch": h.epoch, "data_path": h.data_path}


def progress(rec: ServiceRecord, serving: ServiceHealth | None,
             replica: ServiceHealth | None, replica_alive: bool) -> list[str]:
    """What is going on with the service, one line each (empty when there is nothing to say):
    the drain, why it is unprotected, the resync, the failure, unreplicated writes."""
    lines: list[str] = []
    if rec.waiting_for:
        lines.append(rec.waiting_for)
    op = rec.operation
    running = [(i, r) for i, r in enumerate(op.steps if op else [], 1) if r.status == "running"]
    if running and rec.state is not State.FAILED:
        i, r = running[0]
        lines.append(f"step {i}/{len(op.steps) if op else 0}: {r.title} ({_runs_it(op, r)})"
                     + (f": {r.output.splitlines()[-1]}" if r.output else ""))
    if rec.state is State.UNPROTECTED:  # (a drain's line is the summary: drain_line)
        lines.append(f"unprotected: {_why_unprotected(rec, serving, replica, replica_alive)}")
    if rec.resync is not None:
        lines.append(resync_line(rec.resync))
    elif rec.state is State.RESYNCING:
        lines.append(f"resyncing: waiting for {rec.primary} to report its replica protected")
    if rec.state is State.FAILED and rec.operation is not None:
        lines.append(f"failed in {rec.operation.failed_step or 'an unknown step'}: "
                     f"{rec.operation.error or 'no reason recorded'} (retry or cancel)")
        for r in rec.operation.steps:
            if r.status == "failed" and r.output:
                lines.append(f"output of {r.name}: " + " | ".join(r.output.splitlines()[-3:]))
    if rec.unreplicated_blocks:
        lines.append("unreplicated writes set aside: "
                     f"{count(rec.unreplicated_blocks, 'block')} in "
                     f"{rec.unreplicated_file or 'an unnamed file'} (on {rec.replica})")
    return lines


def drain_line(rec: ServiceRecord, serving: ServiceHealth | None) -> str:
    barrier = serving is not None and serving.barrier
    return (f"draining: replica lag {seconds(rec.last_lag_seconds)}, write barrier "
            f"{'up' if barrier else 'not up yet'}")


def _runs_it(op: Operation | None, run: StepRun) -> str:
    """Who runs a step, as an operator reads it: the controller, or the site (by name)."""
    if run.owner == Owner.CONTROLLER or op is None:
        return "controller"
    return f"on {op.source if run.owner == Owner.OLD_PRIMARY else op.target}"


def _why_unprotected(rec: ServiceRecord, serving: ServiceHealth | None,
                     replica: ServiceHealth | None, replica_alive: bool) -> str:
    if not replica_alive:
        return f"the replica site {rec.replica} is down"
    if replica is not None and replica.data_path and replica.data_path != "running":
        return f"{rec.replica} is not receiving ({replica.data_path})"
    if serving is not None and serving.data_path and serving.data_path != "running":
        return f"{rec.primary}'s data path: {serving.data_path}"
    if serving is None:
        return f"{rec.primary} does not report the service as its primary"
    if not rec.replica_consistent:
        return (f"{rec.primary} has not reported {rec.replica} protected yet (it holds no "
                "consistent copy: a new service's initial sync, or a resync)")
    if serving.protected is None:
        return f"{rec.primary} does not report whether {rec.replica} is receiving"
    return f"{rec.primary} reports {rec.replica} not receiving at epoch {rec.epoch}"


def resync_line(r: dict[str, Any]) -> str:
    eta = r.get("eta_seconds")
    if r.get("bytes_left") == 0 and r.get("bytes_total"):
        # everything is read and planned; protection is reported once acked and verified
        return (f"resync ({r.get('mode', '?')}): all {human_bytes(r.get('bytes_total'))} read "
                "and sent, waiting for the target's acknowledgement and the verify")
    return (f"resync ({r.get('mode', '?')}): {human_bytes(r.get('bytes_left'))} left of "
            f"{human_bytes(r.get('bytes_total'))}, ETA "
            f"{'unknown' if eta is None else duration(float(eta))}")


def human_bytes(n: object) -> str:
    if not isinstance(n, int | float):
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(s: float) -> str:
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
