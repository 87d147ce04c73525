"""What lives in etcd under /drctl/<cluster>/, as JSON records.

  sites/<site>/heartbeat        lease-bound; the site agent's report (Heartbeat)
  controllers/leader            lease-bound; the leading controller's id
  services/<svc>/state          the service's state machine record (ServiceRecord), written
                                by the leader with compare-and-set on its mod_revision
  services/<svc>/command        an operator's request (CommandRecord), consumed by the leader
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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


@dataclass
class ServiceHealth:
    role: str  # "primary" | "replica" | "fenced"
    epoch: int
    lag_seconds: float | None = None


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
        return cls(d["site"], d["at"], {k: ServiceHealth(**v)
                                         for k, v in d.get("services", {}).items()})


@dataclass
class Operation:
    kind: str  # "failover" | "switchover"
    source: str  # the old primary
    target: str  # the new primary
    started_at: float
    dns_done: bool = False
    failed_step: str | None = None
    error: str | None = None


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

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> ServiceRecord:
        d = json.loads(raw)
        op = d.pop("operation", None)
        rec = cls(**{**d, "state": State(d["state"])})
        rec.operation = Operation(**op) if op else None
        return rec


@dataclass
class CommandRecord:
    command: Command
    target: str | None
    id: str
    at: float

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> CommandRecord:
        d = json.loads(raw)
        return cls(Command(d["command"]), d.get("target"), d["id"], d["at"])


def service_record(raw: bytes | None, primary: str, replica: str,
                   since: float = 0.0) -> ServiceRecord:
    """The stored record, or the configured starting point when none is stored yet."""
    if raw is None:
        return ServiceRecord(State.HEALTHY, since, primary, replica)
    return ServiceRecord.decode(raw)
