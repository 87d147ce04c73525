"""The cluster configuration: what the daemons run on, from a runbook (runbooks/cluster.py)
or from this older, smaller YAML format (cluster.yaml), strict, typed, validated at load time.

Unknown keys are errors; every error names the file, the line and the field. Timing
invariants are checked here, not silently adjusted. A cluster.yaml's hooks become the steps
of every operation in this order (``_steps``): fence and stop at the old primary, promote,
then promote and start at the new primary, then dns; each hook has 60 s. `drctl runbook
convert cluster.yaml` writes the equivalent runbook (docs/operations.md).

    cluster: demo
    etcd: [127.0.0.1:2379]       # or {endpoints: [...], user:, password_file:|password_env:,
                                 #     ca:, cert:, key:} (failover/coordination/credentials.py)
    lease_ttl: 2                 # heartbeat and leader leases (s)
    sites:
      east: {address: 10.0.0.1, health_url: http://10.0.0.1:8080/health}
      west: {address: 10.0.0.2}
    services:
      app:
        primary: east
        replica: west
        policy: {automatic: true, grace: 2, rpo: 30, damping: 600, allow_data_loss: false}
        dns:
          zone: dr.test
          name: app
          ttl: 5
          servers: [127.0.0.1:5353]        # every authoritative server (verified)
          update: [127.0.0.1:5353]         # where updates are sent (default: servers)
          tsig: {name: dr-updater, file: /etc/drctl/tsig.key}   # or env: VAR
        hooks: {promote: "...", fence: "...", start: "...", stop: "..."}
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from drctl.yamlstrict import (
    DuplicateKeyError,
    LineDict,
    load_yaml,
    yaml_error_line,
    yaml_problem,
)
from failover.coordination import credentials
from failover.coordination.credentials import CredentialsError, EtcdCredentials
from failover.dns.rfc2136 import RecordSet, Server, TsigKey
from failover.errors import FailoverError
from failover.fsm import Policy, State
from failover.lease import check_timings
from failover.steps import Owner, Planned, StepKind, StepSpec, operation_plan, phase_budget

HOOK_TIMEOUT = 60.0  # a cluster.yaml hook's timeout


class ConfigError(FailoverError, ValueError):
    code = "config"
    http_status = 400
    exit_code = 2


class _Reader:
    def __init__(self, path: str, secrets: bool = True) -> None:
        self.path = path
        self.secrets = secrets  # read the TSIG keys (not for a command that only reads etcd)

    def fail(self, node: Any, key: str, where: str, message: str) -> ConfigError:
        line = node.lines.get(key, node.line) if isinstance(node, LineDict) else 0
        return ConfigError(f"{self.path}:{line}: {where}{'.' if where else ''}{key}: {message}")

    def mapping(self, node: Any, where: str, allowed: set[str],
                required: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
        if node is None and not where:
            raise ConfigError(f"{self.path}: the file is empty (expected a cluster "
                              "configuration or a runbook)")
        if not isinstance(node, dict):
            raise ConfigError(f"{self.path}: {where or 'top level'}: expected a mapping")
        for key in node:
            if key not in allowed:
                raise self.fail(node, key, where, f"unknown key (allowed: "
                                                  f"{', '.join(sorted(allowed))})")
        missing = sorted(k for k in required if k not in node)
        if missing:
            line = node.line if isinstance(node, LineDict) else 0
            raise ConfigError(f"{self.path}:{line}: {where or 'top level'}: missing required "
                              f"key{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(repr(k) for k in missing)}")
        return node

    def number(self, node: dict[str, Any], key: str, where: str, default: float,
               minimum: float = 0.0) -> float:
        value = node.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise self.fail(node, key, where, f"expected a number >= {minimum}, got {value!r}")
        return float(value)

    def boolean(self, node: dict[str, Any], key: str, where: str, default: bool) -> bool:
        value = node.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(node, key, where, f"expected true or false, got {value!r}")
        return value

    def string(self, node: dict[str, Any], key: str, where: str,
               default: str | None = None) -> str:
        value = node.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.fail(node, key, where, f"expected a non-empty string, got {value!r}")
        return value

    def hostports(self, node: dict[str, Any], key: str, where: str,
                  default_port: int) -> list[Server]:
        value = node.get(key)
        if not isinstance(value, list) or not value:
            raise self.fail(node, key, where, "expected a non-empty list of HOST:PORT")
        out = []
        for item in value:
            try:
                out.append(Server.parse(item, default_port))
            except ValueError as exc:
                raise self.fail(node, key, where, str(exc)) from None
        return out


@dataclass(frozen=True)
class Site:
    name: str
    address: str
    health_url: str | None = None
    replication: str | None = None  # this site's replication target (HOST:PORT)


@dataclass(frozen=True)
class DnsConfig:
    record: RecordSet  # values are filled in per failover: the new primary's address
    servers: tuple[Server, ...]
    update: tuple[Server, ...]
    key: TsigKey | None  # None: not read (a command that only reads the cluster's state)
    verify_timeout: float = 10.0

    def tsig(self) -> TsigKey:
        """The key that signs the record's updates."""
        if self.key is None:
            raise ConfigError(f"{self.record.name}.{self.record.zone}: the TSIG key was not "
                              "read (this command loaded the configuration without secrets)")
        return self.key

    def for_address(self, address: str) -> RecordSet:
        r = self.record
        return RecordSet(r.zone, r.name, r.rtype, r.ttl, (address,))


@dataclass(frozen=True)
class Hooks:
    """What a site agent runs on a role change that is not a step of an operation: ``start``
    when it takes the primary role (at start-up too), ``promote`` first when it was not the
    primary, ``fence`` and ``stop`` when it stops writing (its lease about to be lost, or
    found primary where the record says replica). Each is a list of hook or health check
    steps, run in order with their own timeouts."""

    start: tuple[StepSpec, ...] = ()
    stop: tuple[StepSpec, ...] = ()
    fence: tuple[StepSpec, ...] = ()
    promote: tuple[StepSpec, ...] = ()


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    primary: str
    replica: str
    policy: Policy
    dns: tuple[DnsConfig, ...]  # every record the dns step rewrites and verifies
    hooks: Hooks
    # the volumes replicated for it (from a runbook): named in the epoch tokens the
    # controller signs (drctl/epochtoken.py)
    volumes: tuple[str, ...] = ()
    steps: tuple[StepSpec, ...] = ()  # an operation's steps, in the runbook's order
    depends_on: tuple[str, ...] = ()  # services that fail over (and back) before this one

    def __post_init__(self) -> None:
        if not isinstance(self.dns, tuple):  # one record, or none
            object.__setattr__(self, "dns", () if self.dns is None else (self.dns,))

    def plan(self, switchover: bool) -> list[Planned]:
        """The steps an operation of this service runs, in order."""
        return operation_plan(self.steps, switchover, self.policy.drain_timeout_seconds)


def with_step_timeouts(policy: Policy, steps: tuple[StepSpec, ...]) -> Policy:
    """Each phase's timeout: its steps' own timeouts plus an allowance for what they do not
    bound (the data path's promotion, DNS verification), so a step's timeout, not its
    phase's, is what stops a slow step."""
    plan = operation_plan(steps, True, policy.drain_timeout_seconds)
    return replace(policy,
                   prepare_timeout_seconds=30 + phase_budget(plan, State.PREPARING),
                   fence_timeout_seconds=60 + phase_budget(plan, State.FENCING),
                   promote_timeout_seconds=120 + phase_budget(plan, State.PROMOTING),
                   reroute_timeout_seconds=120 + phase_budget(plan, State.REROUTING))


@dataclass(frozen=True)
class ClusterConfig:
    path: str
    cluster: str
    etcd: tuple[tuple[str, int], ...]
    lease_ttl: int
    sites: dict[str, Site]
    services: dict[str, ServiceConfig] = field(default_factory=dict)
    etcd_credentials: EtcdCredentials = field(default_factory=EtcdCredentials)  # resolved

    @property
    def prefix(self) -> str:
        return f"/drctl/{self.cluster}/"

    def secrets(self) -> list[str]:
        """Secrets this configuration holds (never shown in a step's recorded output)."""
        out = [self.etcd_credentials.password or ""]
        out += [d.key.secret for s in self.services.values() for d in s.dns if d.key]
        return [s for s in out if s]


def load(path: str, secrets: bool = True) -> ClusterConfig:
    """The configuration of ``path``; ``secrets`` false: the TSIG keys are checked as written
    (one of file: or env:) but not read (``drctl status`` needs no key to read etcd)."""
    try:
        raw = load_yaml(path)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        line = yaml_error_line(exc)
        where = f":{line}" if line is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {yaml_problem(exc, path)}") from exc
    r = _Reader(path, secrets)
    top = r.mapping(raw, "", {"cluster", "etcd", "lease_ttl", "sites", "services"},
                    {"cluster", "etcd", "sites"})
    ttl = r.number(top, "lease_ttl", "", 2, minimum=1)
    if ttl != int(ttl):
        raise r.fail(top, "lease_ttl", "", "must be a whole number of seconds")
    etcd, etcd_credentials = _etcd(r, top)
    sites_node = r.mapping(top["sites"], "sites", set(top["sites"] or {}))
    sites = {}
    for name, node in sites_node.items():
        where = f"sites.{name}"
        n = r.mapping(node, where, {"address", "health_url", "replication"}, {"address"})
        sites[name] = Site(name, r.string(n, "address", where),
                           n.get("health_url") and r.string(n, "health_url", where),
                           n.get("replication") and r.string(n, "replication", where))
    services = {}
    for name, node in (r.mapping(top.get("services") or {}, "services",
                                 set(top.get("services") or {}))).items():
        services[name] = _service(r, name, node, sites, int(ttl))
    return ClusterConfig(path, r.string(top, "cluster", ""), etcd, int(ttl), sites, services,
                         etcd_credentials)


def _etcd(r: _Reader, top: dict[str, Any]) -> tuple[tuple[tuple[str, int], ...],
                                                     EtcdCredentials]:
    """``etcd:``, a list of HOST:PORT or a mapping with endpoints: and credentials; the
    password and TLS files are read now (a password file others can read is refused)."""
    value = top["etcd"]
    if not isinstance(value, dict):
        return tuple((s.host, s.port) for s in r.hostports(top, "etcd", "", 2379)), \
            EtcdCredentials()
    _, creds, problems = credentials.parse(value)
    for key, message in problems:
        raise r.fail(value, key, "etcd", message) if key else r.fail(top, "etcd", "", message)
    endpoints = tuple((s.host, s.port) for s in r.hostports(value, "endpoints", "etcd", 2379))
    try:
        return endpoints, creds.resolved()
    except CredentialsError as exc:
        raise r.fail(value, exc.field, "etcd", str(exc)) from None


def _service(r: _Reader, name: str, node: Any, sites: dict[str, Site],
             ttl: int) -> ServiceConfig:
    where = f"services.{name}"
    n = r.mapping(node, where, {"primary", "replica", "policy", "dns", "hooks"},
                  {"primary", "replica"})
    for role in ("primary", "replica"):
        if n[role] not in sites:
            raise r.fail(n, role, where, f"unknown site {n[role]!r} (sites: "
                                         f"{', '.join(sorted(sites))})")
    if n["primary"] == n["replica"]:
        raise r.fail(n, "replica", where, "must differ from primary")
    pw = f"{where}.policy"
    p = r.mapping(n.get("policy") or {}, pw, {"automatic", "grace", "rpo", "damping",
                                               "allow_data_loss", "drain_timeout"})
    policy = Policy(automatic=r.boolean(p, "automatic", pw, True),
                    grace_seconds=r.number(p, "grace", pw, 2 * ttl),
                    rpo_seconds=r.number(p, "rpo", pw, 30),
                    allow_data_loss=r.boolean(p, "allow_data_loss", pw, False),
                    damping_seconds=r.number(p, "damping", pw, 600),
                    drain_timeout_seconds=r.number(p, "drain_timeout", pw, 120))
    check_timings(ttl, ttl / 3, ttl / 6)
    hw = f"{where}.hooks"
    h = r.mapping(n.get("hooks") or {}, hw, {"start", "stop", "fence", "promote"})
    where_hook = {"fence": Owner.OLD_PRIMARY, "stop": Owner.OLD_PRIMARY,
                  "promote": Owner.NEW_PRIMARY, "start": Owner.NEW_PRIMARY}
    hooks = Hooks(**{k: (StepSpec(StepKind.HOOK, k, where_hook[k], run=r.string(h, k, hw),
                                  timeout=HOOK_TIMEOUT),) for k in h})
    dns = (_dns(r, f"{where}.dns", n["dns"]),) if "dns" in n else ()
    steps = _steps(hooks, bool(dns))
    return ServiceConfig(name, n["primary"], n["replica"], with_step_timeouts(policy, steps),
                         dns, hooks, steps=steps)


def _steps(hooks: Hooks, dns: bool) -> tuple[StepSpec, ...]:
    """A cluster.yaml's operation: its hooks as steps, where the agents ran them."""
    return (*hooks.fence, *hooks.stop, StepSpec(StepKind.PROMOTE, "promote", Owner.NEW_PRIMARY),
            *hooks.promote, *hooks.start,
            *((StepSpec(StepKind.DNS, "dns"),) if dns else ()))


def _dns(r: _Reader, where: str, node: Any) -> DnsConfig:
    n = r.mapping(node, where, {"zone", "name", "type", "ttl", "servers", "update", "tsig",
                                "verify_timeout"}, {"zone", "name", "servers", "tsig"})
    servers = r.hostports(n, "servers", where, 53)
    update = r.hostports(n, "update", where, 53) if "update" in n else servers
    tw = f"{where}.tsig"
    t = r.mapping(n["tsig"], tw, {"name", "file", "env", "algorithm"}, {"name"})
    if ("file" in t) == ("env" in t):
        raise r.fail(n, "tsig", where, "give exactly one of file: or env: (never the secret "
                                       "itself)")
    key: TsigKey | None = None
    try:
        if not r.secrets:
            pass
        elif "file" in t:
            key = TsigKey.from_bind_file(r.string(t, "file", tw))
            for field_, said in (("name", key.name), ("algorithm", key.algorithm)):
                if t.get(field_, said) != said:  # the key file names both
                    raise r.fail(t, field_, tw, f"{t[field_]!r}, but {t['file']} holds a "
                                                f"{key.algorithm} key named {key.name!r}")
        else:
            key = TsigKey.from_env(r.string(t, "name", tw), r.string(t, "env", tw),
                                   t.get("algorithm", "hmac-sha256"))
    except ConfigError:
        raise
    except FailoverError as exc:
        raise r.fail(n, "tsig", where, str(exc)) from None
    rtype = r.string(n, "type", where, "A")
    record = RecordSet(r.string(n, "zone", where), r.string(n, "name", where), rtype,
                       int(r.number(n, "ttl", where, 30)), ())
    return DnsConfig(record, tuple(servers), tuple(update), key,
                     r.number(n, "verify_timeout", where, 10))
