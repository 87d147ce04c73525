"""What lives in etcd under /drctl/<cluster>/, as JSON records.

  sites/<site>/heartbeat        lease-bound; the site agent's report (Heartbeat)
  controllers/leader            lease-bound; the leading controller's id
  services/<svc>/state          the service's state machine record (ServiceRecord), written
                                by the leader with compare-and-set on its mod_revision
  services/<svc>/command        an operator's request (CommandRecord, with who asked: Actor),
                                consumed by the leader
  audit/<seq, 12 digits>        the hash-chained audit log (failover/audit.py), append-only
  audit/head                    {"seq", "hash"} of its last record, written in the same
                                transaction as the record
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from failover.fsm import Command, State


def heartbeat_key(prefix: str, site: str) -> str:
    return f"{prefix}sites/{site}/heartbeat"


def state_key(prefix: str, service: str) -> str:
    return f"{prefix}services/{service}/state"


def command_key(prefix: str, service: str) -> str:
    return f"{prefix}services/{service}/command"


def leader_key(prefix: str) -> str:
    return f"{prefix}controllers/leader"


def audit_prefix(prefix: str) -> str:
    return f"{prefix}audit/"


def audit_key(prefix: str, seq: int) -> str:
    return f"{prefix}audit/{seq:012d}"


def audit_head_key(prefix: str) -> str:
    return f"{prefix}audit/head"


@dataclass
class ServiceHealth:
    """One service as a site agent reports it. Every field after ``epoch`` has a default, so
    an older agent's heartbeat still decodes (and fields a newer agent adds are ignored)."""

    role: str  # "primary" | "replica" | "fenced"
    epoch: int
    lag_seconds: float | None = None
    # primary only: its replica holds a consistency point at the current epoch and is
    # receiving (None: unknown, or not the primary)
    protected: bool | None = None
    barrier: bool = False  # primary only: the write barrier is up (set while `draining`)
    # primary only, while re-protecting:
    # {"mode": "exact"|"hash", "bytes_total": int, "bytes_left": int, "eta_seconds": float|None}
    resync: dict[str, Any] | None = None
    # replica only: blocks the old primary wrote that were never replicated, set aside before
    # being overwritten, and where
    unreplicated_blocks: int = 0
    unreplicated_file: str | None = None
    data_path: str = ""  # free text: "running", "starting", "restarting in 4s: <reason>"...
    # the outcomes of the operation steps this site ran (StepReport), for the controller to
    # copy into the operation's record
    steps: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServiceHealth:
        return cls(**{k: v for k, v in d.items() if k in _HEALTH_FIELDS})


@dataclass
class StepReport:
    """A site agent's outcome of one operation step (in its heartbeat): ``index`` is the
    step's place in the operation, ``epoch`` and ``attempt`` say which run it belongs to."""

    index: int
    name: str
    epoch: int
    attempt: int
    status: str  # "done" | "skipped" (nothing to do at this site) | "failed" | "waiting"
    seconds: float = 0.0
    output: str = ""
    error: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepReport:
        return cls(**{k: v for k, v in d.items() if k in _REPORT_FIELDS})


@dataclass
class Heartbeat:
    site: str
    at: float
    services: dict[str, ServiceHealth] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Heartbeat:
        d = json.loads(raw)
        return cls(d["site"], d["at"], {k: ServiceHealth.from_dict(v)
                                         for k, v in d.get("services", {}).items()})


@dataclass
class StepRun:
    """One step of an operation as it runs: the plan (failover/steps.py ``operation_plan``)
    is written into the operation when it starts, and each step's owner fills in its
    outcome. ``spec`` is the step's place in the service's listed steps (None: added by
    drctl, the fence or a switchover's drain)."""

    name: str
    kind: str
    owner: str  # controller | old_primary | new_primary
    phase: str  # the state it runs in
    spec: int | None = None
    status: str = "pending"  # pending | running | done | failed | skipped
    attempt: int = 0
    started_at: float | None = None
    seconds: float | None = None
    output: str = ""  # the end of its output (bounded, secrets replaced)
    error: str | None = None

    @property
    def title(self) -> str:
        """``promote``, or ``hook "stop web"``: the kind, and the name where it says more."""
        return self.kind if self.name in ("", self.kind) else f"{self.kind} {self.name!r}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepRun:
        return cls(**{k: v for k, v in d.items() if k in _RUN_FIELDS})


@dataclass(frozen=True)
class Actor:
    """Who asked: an API user (``via`` api: the name and role it authenticated as), a drctl
    command (cli: ``user@host``, the actor of its audit record) or the controller itself
    (controller: its node id; an automatic operation). Records written before requests said
    who asked have none (None): an unknown user."""

    name: str
    role: str = ""  # the API user's role ("" from the CLI and the controller)
    via: str = ""  # api | cli | controller

    def describe(self) -> str:
        """``asked by alice (operator)``, ``asked by bob@host (drctl CLI)``, ``automatic
        (controller c1)``; ``asked by admin`` for a user named as its role."""
        name = _printable(self.name)
        if self.via == "controller":
            return f"automatic (controller {name})"
        if self.via == "cli":
            return f"asked by {name} (drctl CLI)"
        role = _printable(self.role)
        return f"asked by {name}" + (f" ({role})" if role and role != name else "")

    @classmethod
    def from_dict(cls, d: Any) -> Actor | None:
        """None for a record without one (older) or with one unreadable."""
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not d["name"]:
            return None
        return cls(d["name"], str(d.get("role") or ""), str(d.get("via") or ""))


def asked_text(by: Actor | None, automatic: bool = False) -> str:
    """Who asked, for people: the actor, else ``automatic`` for an operation the controller
    started (recorded before operations said by whom), else ``asked by an unknown user``."""
    if by is not None:
        return by.describe()
    return "automatic" if automatic else "asked by an unknown user"


def _printable(text: str) -> str:
    """``text`` without control characters (a name printed in a terminal or a log line)."""
    return "".join(c if c.isprintable() else "?" for c in text)[:128]


@dataclass
class Request:
    """A request on an operation after it began: a retry, a cancel, a failover overtaking a
    switchover's drain; who asked it and when (the command's time)."""

    command: str
    by: Actor | None
    at: float
    id: str | None = None  # the request's (CommandRecord.id; None: recorded before ids were)

    @property
    def asked(self) -> str:
        return f"{self.command} {asked_text(self.by)}"

    @classmethod
    def from_dict(cls, d: Any) -> Request | None:
        if not isinstance(d, dict) or not isinstance(d.get("command"), str):
            return None
        at, rid = d.get("at"), d.get("id")
        return cls(d["command"], Actor.from_dict(d.get("by")),
                   float(at) if isinstance(at, int | float) else 0.0,
                   rid if isinstance(rid, str) else None)


@dataclass
class Operation:
    kind: str  # "failover" | "switchover" | "resync" (recorded when a resync fails)
    source: str  # the old primary (resync: the primary, the source of the data)
    target: str  # the new primary (resync: the replica being resynced)
    started_at: float
    dns_done: bool = False
    failed_step: str | None = None
    error: str | None = None
    steps: list[StepRun] = field(default_factory=list)
    attempt: int = 0  # raised by each operator retry: owners run the failed steps again
    forced: bool = False  # failover --force: data loss accepted (the lag precheck passes)
    # False while the operation prepares or drains (the epoch is not bumped yet: the target
    # is granted nothing); an operation recorded before these fields existed was fencing
    fenced: bool = True
    outcome: str = ""  # once it is over: done, cancelled, abandoned (last_operation)
    requested_for: str | None = None  # a dependent's request made this one (depends_on)
    # started by the controller (grace expired), not by a request: a primary back before the
    # fence cancels it (an operation recorded before this field existed was requested)
    automatic: bool = False
    # who asked for it (the command's actor; the controller for an automatic one) and when
    # (the command's time): None in a record from before operations said so (unknown)
    asked_by: Actor | None = None
    asked_at: float | None = None
    # the requests on it after it began (retry, cancel, a failover overtaking the drain)
    later_requests: list[Request] = field(default_factory=list)
    # the id of the request that started it (CommandRecord.id, which the CLI and the API
    # return): None for an automatic one, or one recorded before operations kept it
    request_id: str | None = None

    @property
    def asked(self) -> str:
        """``asked by alice (operator)``, ``automatic (controller c1)``; a dependency's
        operation adds the dependent it was asked for."""
        text = asked_text(self.asked_by, self.automatic)
        return f"{text} for {self.requested_for}" if self.requested_for else text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Operation:
        """An operation recorded before operations had steps decodes with none: the daemons
        build its plan from the service's runbook (failover/operation.py ``with_plan``).
        One recorded before they said who asked decodes with ``asked_by`` None."""
        known = {k: v for k, v in d.items() if k in _OPERATION_FIELDS}
        known["steps"] = [StepRun.from_dict(s) for s in d.get("steps") or []]
        known["asked_by"] = Actor.from_dict(d.get("asked_by"))
        known["later_requests"] = [r for r in map(Request.from_dict,
                                                   d.get("later_requests") or []) if r]
        return cls(**known)


@dataclass
class ServiceRecord:
    state: State
    since: float
    primary: str
    replica: str
    epoch: int = 1
    last_failover_at: float | None = None
    primary_lost_since: float | None = None
    last_lag_seconds: float | None = None
    operation: Operation | None = None
    message: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    # copied from the heartbeats each tick: the primary's resync progress (ServiceHealth.resync)
    # and the replica's set-aside unreplicated writes
    resync: dict[str, Any] | None = None
    unreplicated_blocks: int = 0
    unreplicated_file: str | None = None
    # False from the moment the replica is known to be mid-resync (and in a new service's
    # record) until the primary reports it protected: only a forced failover may promote it
    # meanwhile
    replica_consistent: bool = True
    # the leading controller's signed grant of ``epoch`` to the site that is primary at it
    # (drctl/epochtoken.py): replication targets raise an epoch only on it
    epoch_token: str = ""
    # the operation before this one (or the one just over), with its steps' outcomes
    last_operation: Operation | None = None
    # why the service does not start its operation yet (a dependency still failing over)
    waiting_for: str | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> ServiceRecord:
        d = json.loads(raw)
        op = d.pop("operation", None)
        last = d.pop("last_operation", None)
        known = {k: v for k, v in d.items() if k in _RECORD_FIELDS}
        rec = cls(**{**known, "state": State(d["state"])})
        rec.operation = Operation.from_dict(op) if op else None
        rec.last_operation = Operation.from_dict(last) if last else None
        return rec


@dataclass
class CommandRecord:
    command: Command
    target: str | None
    id: str
    at: float
    # who asked: the API user, the drctl CLI's user@host (None: written by a drctl from
    # before commands said so)
    by: Actor | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> CommandRecord:
        d = json.loads(raw)
        return cls(Command(d["command"]), d.get("target"), d["id"], d["at"],
                   Actor.from_dict(d.get("by")))


def service_record(raw: bytes | None, primary: str, replica: str,
                   since: float = 0.0) -> ServiceRecord:
    """The stored record, or the configured starting point when none is stored yet."""
    if raw is None:
        # A new service: its replica holds nothing consistent until the primary first reports
        # it protected (an automatic or plain manual failover before that would promote an
        # empty or half-synced replica), so it starts unprotected, not healthy.
        return ServiceRecord(State.UNPROTECTED, since, primary, replica,
                             replica_consistent=False,
                             message="unprotected: a new service; its primary has not reported "
                                     "its replica protected yet")
    return ServiceRecord.decode(raw)


_HEALTH_FIELDS = frozenset(f.name for f in fields(ServiceHealth))
_RECORD_FIELDS = frozenset(f.name for f in fields(ServiceRecord))
_REPORT_FIELDS = frozenset(f.name for f in fields(StepReport))
_RUN_FIELDS = frozenset(f.name for f in fields(StepRun))
_OPERATION_FIELDS = frozenset(f.name for f in fields(Operation))


def refuse_request(rec: ServiceRecord, service: str, request: str,
                   target: str | None) -> str | None:
    """Why an operator's request cannot be carried out on this record (None: it can be sent).

    ``request`` is failover | switchover | failback | retry | cancel; the CLI and the API both
    check it before writing a command (the controller checks the target again)."""
    if request in ("retry", "cancel"):
        if rec.state is not State.FAILED:
            return f"{request} of {service} refused: nothing failed (the service is {rec.state})"
        return None
    # the target first: "already the primary" says more than the state does
    if (refusal := refuse_target(rec, service, request, target)) is not None:
        return refusal
    if request in ("switchover", "failback") and rec.state is not State.HEALTHY:
        return f"{request} of {service} refused: the service is {rec.state}, not healthy"
    return None


def refuse_target(rec: ServiceRecord, service: str, request: str,
                  target: str | None) -> str | None:
    """A failover or switchover can only go to the site holding the replica."""
    if target is None or target == rec.replica:
        return None
    if target == rec.primary:
        return (f"{request} to {target} refused: {target} is already the primary of {service} "
                f"(replica: {rec.replica})")
    return (f"{request} to {target} refused: {target} holds no replica of {service} "
            f"(replica: {rec.replica})")
