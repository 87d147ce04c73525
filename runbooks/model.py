"""The typed runbook model. Steps are a tagged union on ``type``."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from failover.coordination.credentials import EtcdCredentials


class StepType(StrEnum):
    PRECHECK = "precheck"
    HOOK = "hook"
    WAIT_REPLICATION = "wait_replication"
    PROMOTE = "promote"
    HEALTH_CHECK = "health_check"
    DNS = "dns"


class Where(StrEnum):
    OLD_PRIMARY = "old_primary"
    NEW_PRIMARY = "new_primary"
    CONTROLLER = "controller"


@dataclass(frozen=True)
class Step:
    type: StepType
    name: str
    line: int
    run: str | None = None  # hook: shell command
    on: Where = Where.CONTROLLER
    check: str | None = None  # precheck: replication_lag | sites_reachable
    http: str | None = None  # health_check probes: one of http / tcp / command
    tcp: str | None = None
    command: str | None = None
    timeout: float = 30.0
    retries: int = 0
    interval: float = 1.0


@dataclass(frozen=True)
class Volume:
    name: str
    path: str
    group: str | None = None


@dataclass(frozen=True)
class DnsRecord:
    zone: str
    name: str
    type: str
    ttl: int


@dataclass(frozen=True)
class Zone:
    name: str
    servers: tuple[str, ...]
    update: tuple[str, ...]
    tsig_name: str
    tsig_file: str | None
    tsig_env: str | None


@dataclass(frozen=True)
class Service:
    name: str
    primary: str
    replica: str
    volumes: tuple[Volume, ...]
    mode: str  # hot | warm
    rate_limit: int | None
    rpo: float
    automatic: bool
    grace: float
    damping: float
    allow_data_loss: bool
    dns: tuple[DnsRecord, ...]
    steps: tuple[Step, ...]
    depends_on: tuple[str, ...] = ()
    # The data path the site agents run (replication: block)
    compress_level: int = 1  # zstd level; 0: no compression
    cp_interval: float = 0.0  # cut after writes wait this long unflushed (0: once sendable)
    journal_limit: int = 1 << 30  # change journal size before the change bitmap takes over
    apply_interval: float | None = None  # warm mode: apply complete points on this schedule
    export: dict[str, str] = field(default_factory=dict)  # site -> NBD HOST:PORT of the app

    @property
    def group(self) -> str:
        """The consistency group the service's volumes are captured in (one journal)."""
        return next((v.group for v in self.volumes if v.group), None) or self.name


@dataclass(frozen=True)
class Site:
    name: str
    address: str
    endpoints: dict[str, str] = field(default_factory=dict)
    data_dir: str | None = None  # where the site agent keeps replicas, journals, logs


@dataclass(frozen=True)
class Runbook:
    path: str
    cluster: str
    etcd: tuple[str, ...]
    lease_ttl: int
    sites: dict[str, Site]
    zones: dict[str, Zone]
    services: dict[str, Service]
    # etcd: as a mapping: a user, where the password is, TLS files (not read yet)
    etcd_credentials: EtcdCredentials = field(default_factory=EtcdCredentials)
