"""The typed runbook model. Steps are a tagged union on ``type``."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from failover.coordination.credentials import EtcdCredentials
from failover.steps import Owner, StepKind, StepSpec, owner_of

VERIFY_RATE = 2 << 20  # bytes/s: the capture agent's default (replicator.driver)


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

    def spec(self) -> StepSpec:
        """The step as the daemons run it (failover/steps.py)."""
        kind = StepKind(self.type.value)
        owner = Owner(self.on.value) if kind is StepKind.HOOK else owner_of(kind)
        return StepSpec(kind, self.name, owner, run=self.run, check=self.check, http=self.http,
                        tcp=self.tcp, command=self.command, timeout=self.timeout,
                        retries=self.retries, interval=self.interval)


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
    tsig_algorithm: str | None = None  # with env: (a key file names its own)
    verify_timeout: float = 10.0  # seconds every server has to answer a rewritten record


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
    export_tls: bool = False  # the export takes only mutual TLS (push --nbd-tls)
    # operators whose certificates may attach to the TLS export besides the site's own
    # (push --nbd-allow operator:NAME; "*": any operator)
    export_operators: tuple[str, ...] = ()
    verify_rate: int = VERIFY_RATE  # background verify of the replica, bytes/s (0: off)
    # a switchover's drain: wait_replication's timeout, or failover.drain_timeout
    drain_timeout: float = 120.0

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
