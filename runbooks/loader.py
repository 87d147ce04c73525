"""Load and validate a runbook, collecting *every* error as ``file:line: field: message``."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import yaml

from drctl.yamlstrict import DuplicateKeyError, LineDict, load_yaml, yaml_error_line
from failover.coordination import credentials
from failover.coordination.credentials import EtcdCredentials
from failover.steps import problems as step_problems
from runbooks.model import (
    VERIFY_RATE,
    DnsRecord,
    Runbook,
    Service,
    Site,
    Step,
    StepType,
    Volume,
    Where,
    Zone,
)

KIND = "drctl-runbook"


class RunbookError(Exception):
    """The runbook cannot be used: unreadable, not YAML, not a runbook, or invalid (every
    error as file:line: field: message)."""

    code = "runbook_invalid"
    exit_code = 2  # a configuration error, as failover.config.ConfigError (docs/cli.md)

    def __init__(self, path: str, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.path = path
        self.errors = errors


_STEP_FIELDS = {
    StepType.PRECHECK: {"check"},
    StepType.HOOK: {"run", "at", "timeout"},
    StepType.WAIT_REPLICATION: {"timeout"},
    StepType.PROMOTE: set(),
    StepType.HEALTH_CHECK: {"http", "tcp", "command", "timeout", "retries", "interval"},
    StepType.DNS: set(),
}
_CHECKS = {"replication_lag", "sites_reachable"}
_TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512")
# replication: the site's target daemon (HOST:PORT); health: a witness URL; source_metrics:
# the metrics endpoint of a source agent the site does not run itself (hook-driven sites);
# target_metrics: the metrics port the site agent gives its target daemon (HOST:PORT)
_ENDPOINTS = {"replication", "health", "source_metrics", "target_metrics"}
# A rate cap below this is almost certainly a unit mistake ("20" or "20kB/s" for 20MB/s)
MIN_RATE_LIMIT = 64 * 1024
_MISSING = object()


class _Checker:
    def __init__(self, path: str) -> None:
        self.path = path
        self.errors: list[str] = []
        self.fields: set[str] = set()  # the fields already reported (no follow-on errors)

    def err(self, node: Any, key: str | None, where: str, message: str) -> None:
        line = 0
        if isinstance(node, LineDict):
            line = node.line_of(key) if key is not None else node.line
        field = f"{where}.{key}" if where and key else (key or where or "(top level)")
        self.fields.add(field)
        self.errors.append(f"{self.path}:{line}: {field}: {message}")

    def mapping(self, node: Any, where: str, allowed: set[str], required: set[str]) -> LineDict:
        if not isinstance(node, LineDict):
            self.errors.append(f"{self.path}:0: {where or '(top level)'}: expected a mapping, "
                               f"got {type(node).__name__}")
            return LineDict()
        for key in node:
            if not isinstance(key, str):
                self.err(node, key, where, f"key {key!r} is not a string (YAML reads on/off/"
                                           "yes/no as booleans: quote it)")
            elif key not in allowed:
                self.err(node, key, where, f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for key in sorted(required - set(node)):
            self.err(node, None, where, f"missing required key {key!r}")
        return node

    def get(self, node: LineDict, key: str, where: str, kind: type | tuple[type, ...],
            default: Any = _MISSING, check: Any = None, hint: str = "") -> Any:
        if key not in node:
            return None if default is _MISSING else default
        value = node[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in
                                              (kind if isinstance(kind, tuple) else (kind,)))
        if ok and check is not None and not check(value):
            ok = False
        if not ok:
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            self.err(node, key, where, f"expected {hint or names}, got {value!r}")
            return None if default is _MISSING else default
        return value


def load(path: str) -> Runbook:
    try:
        raw = load_yaml(path)
    except OSError as exc:
        raise RunbookError(path, [f"{path}:0: cannot read: {exc.strerror}"]) from None
    except DuplicateKeyError as exc:
        raise RunbookError(path, [f"{path}: {exc}"]) from None
    except yaml.YAMLError as exc:
        raise RunbookError(path, [f"{path}:{yaml_error_line(exc) or 0}: not valid YAML: "
                                  f"{getattr(exc, 'problem', exc)}"]) from None
    if not isinstance(raw, dict) or raw.get("kind") != KIND:  # one line, not every key's error
        what = (f"kind is {raw['kind']!r}" if isinstance(raw, dict) and "kind" in raw
                else f"no 'kind: {KIND}'")
        line = raw.lines.get("kind", 1) if isinstance(raw, LineDict) else 1
        raise RunbookError(path, [f"{path}:{line}: not a drctl runbook ({what})"])
    c = _Checker(path)
    rb = _runbook(c, raw)
    if c.errors or rb is None:
        raise RunbookError(path, c.errors)
    return rb


def _runbook(c: _Checker, raw: Any) -> Runbook | None:
    top = c.mapping(raw, "", {"kind", "version", "cluster", "etcd", "lease_ttl", "sites", "dns",
                              "services"}, {"kind", "version", "cluster", "etcd", "sites",
                                            "services"})
    if top.get("kind") not in (None, KIND):
        c.err(top, "kind", "", f"must be {KIND!r}")
    if top.get("version") not in (None, 1):
        c.err(top, "version", "", "only version 1 is understood")
    cluster = c.get(top, "cluster", "", str, "", hint="a name")
    etcd, etcd_credentials = _etcd(c, top)
    ttl = c.get(top, "lease_ttl", "", int, 2, check=lambda v: v >= 1, hint="whole seconds >= 1")
    sites = _sites(c, top.get("sites"))
    zones = _zones(c, top.get("dns") or LineDict())
    services = _services(c, top.get("services"), sites, zones)
    _dependencies(c, top.get("services"), services)
    _site_modes(c, top.get("services"), services)
    return Runbook(c.path, cluster or "", etcd, ttl or 2, sites, zones, services,
                   etcd_credentials)


def _beside(runbook: str, path: str) -> str:
    """A key or credential file named in a runbook: relative to the runbook's directory (so a
    runbook reads the same files whatever the current directory is)."""
    return path if os.path.isabs(path) else os.path.join(
        os.path.dirname(os.path.abspath(runbook)), path)


def _etcd(c: _Checker, top: LineDict) -> tuple[tuple[str, ...], EtcdCredentials]:
    """``etcd:``: a list of HOST:PORT, or a mapping with endpoints: and the credentials
    (user:, password_file: or password_env:, ca:, cert:, key:). Their files are read when the
    runbook is used (runbooks/cluster.py), not when it is validated."""
    def hostports(v: Any) -> bool:
        from failover.dns.rfc2136 import Server

        try:
            return bool(v) and all(isinstance(x, str) and ":" in x and Server.parse(x)
                                   for x in v)
        except ValueError:  # a port out of range, a URL
            return False

    if not isinstance(top.get("etcd"), LineDict):
        etcd = c.get(top, "etcd", "", list, [], check=hostports,
                     hint="a list of HOST:PORT or a mapping with endpoints:")
        return tuple(etcd or ()), EtcdCredentials()
    node = top["etcd"]
    endpoints, creds, problems = credentials.parse(node)
    def near(v: str | None) -> str | None:
        return _beside(c.path, v) if v else v

    creds = dataclasses.replace(creds, password_file=near(creds.password_file),
                                ca=near(creds.ca), cert=near(creds.cert), key=near(creds.key))
    for key, message in problems:
        c.err(node, key, "etcd", message)
    if endpoints and not hostports(endpoints):
        c.err(node, "endpoints", "etcd", f"expected a list of HOST:PORT, got {endpoints!r}")
    return tuple(endpoints), creds


def _sites(c: _Checker, node: Any) -> dict[str, Site]:
    out = {}
    m = c.mapping(node, "sites", set(node or ()), set())
    if not m:
        c.err(m, None, "sites", "declare at least two sites")
    for name, s in m.items():
        where = f"sites.{name}"
        sm = c.mapping(s, where, {"address", "endpoints", "data_dir"}, {"address"})
        endpoints = c.get(sm, "endpoints", where, dict, {},
                          check=lambda v: all(isinstance(x, str) for x in v.values()),
                          hint="a mapping of name: URL or HOST:PORT")
        for key in endpoints or {}:
            if key not in _ENDPOINTS:
                c.err(endpoints, key, f"{where}.endpoints", "unknown endpoint (known: "
                      f"{', '.join(sorted(_ENDPOINTS))})")
        data_dir = c.get(sm, "data_dir", where, str, None, check=lambda v: v.startswith("/"),
                         hint="an absolute path")
        out[name] = Site(name, c.get(sm, "address", where, str, "") or "",
                         dict(endpoints or {}), data_dir)
    return out


def _zones(c: _Checker, node: Any) -> dict[str, Zone]:
    d = c.mapping(node, "dns", {"zones"}, set())
    zones_node = d.get("zones") or LineDict()
    out = {}
    for zname, z in c.mapping(zones_node, "dns.zones", set(zones_node), set()).items():
        where = f"dns.zones.{zname}"
        zm = c.mapping(z, where, {"servers", "update", "tsig", "verify_timeout"},
                       {"servers", "tsig"})
        servers = c.get(zm, "servers", where, list, [], check=bool, hint="a list of HOST:PORT")
        update = c.get(zm, "update", where, list, servers, check=bool, hint="a list")
        t = c.mapping(zm.get("tsig"), f"{where}.tsig", {"name", "file", "env", "algorithm",
                                                          "secret"}, {"name"})
        if "secret" in t:
            c.err(t, "secret", f"{where}.tsig", "inline secrets are not allowed: give file: (a "
                                                "tsig-keygen key file) or env: (a variable)")
        elif ("file" in t) == ("env" in t):
            c.err(t, None, f"{where}.tsig", "give exactly one of file: or env:")
        algorithm = c.get(t, "algorithm", f"{where}.tsig", str, None,
                          check=lambda v: v in _TSIG_ALGORITHMS,
                          hint=" or ".join(_TSIG_ALGORITHMS))
        verify = c.get(zm, "verify_timeout", where, (int, float), 10, check=lambda v: v > 0,
                       hint="seconds > 0")
        out[zname] = Zone(zname, tuple(servers or ()), tuple(update or ()),
                          str(t.get("name", "")),
                          _beside(c.path, t["file"]) if isinstance(t.get("file"), str) else None,
                          t.get("env"), algorithm,
                          float(verify))
    return out


def _services(c: _Checker, node: Any, sites: dict[str, Site],
              zones: dict[str, Zone]) -> dict[str, Service]:
    out = {}
    m = c.mapping(node, "services", set(node or ()), set())
    for name, s in m.items():
        svc = _service(c, name, s, sites, zones)
        if svc is not None:
            out[name] = svc
    return out


def _service(c: _Checker, name: str, node: Any, sites: dict[str, Site],
             zones: dict[str, Zone]) -> Service | None:

    where = f"services.{name}"
    m = c.mapping(node, where, {"primary", "replica", "volumes", "replication", "failover",
                                "dns", "steps", "depends_on"}, {"primary", "replica", "steps"})
    for role in ("primary", "replica"):
        if role in m and m[role] not in sites:
            c.err(m, role, where, f"unknown site {m[role]!r} (sites: {', '.join(sorted(sites))})")
    if "primary" in m and m.get("primary") == m.get("replica"):
        c.err(m, "replica", where, "must differ from primary")
    volumes = []
    for i, v in enumerate(c.get(m, "volumes", where, list, [], hint="a list") or []):
        vw = f"{where}.volumes[{i}]"
        vm = c.mapping(v, vw, {"name", "path", "group"}, {"name", "path"})
        volumes.append(Volume(str(vm.get("name", "")), str(vm.get("path", "")),
                              vm.get("group")))
    rep = _replication(c, m, where, sites)
    fw = f"{where}.failover"
    f = c.mapping(m.get("failover") or LineDict(), fw,
                  {"automatic", "grace", "damping", "allow_data_loss", "drain_timeout"}, set())
    automatic = c.get(f, "automatic", fw, bool, True)
    grace = c.get(f, "grace", fw, (int, float), 4, check=lambda v: v >= 0, hint="seconds >= 0")
    damping = c.get(f, "damping", fw, (int, float), 600, check=lambda v: v >= 0,
                    hint="seconds >= 0")
    loss = c.get(f, "allow_data_loss", fw, bool, False)
    records = []
    for i, d in enumerate(c.get(m, "dns", where, list, [], hint="a list") or []):
        dw = f"{where}.dns[{i}]"
        dm = c.mapping(d, dw, {"zone", "name", "type", "ttl"}, {"zone", "name"})
        if "zone" in dm and dm["zone"] not in zones:
            c.err(dm, "zone", dw, f"zone {dm['zone']!r} is not declared under dns.zones")
        rtype = c.get(dm, "type", dw, str, "A", check=lambda v: v in ("A", "AAAA", "CNAME"),
                      hint="A, AAAA or CNAME")
        ttl = c.get(dm, "ttl", dw, int, 30, check=lambda v: 0 < v <= 86400,
                    hint="seconds in 1..86400")
        records.append(DnsRecord(str(dm.get("zone", "")), str(dm.get("name", "")), rtype, ttl))
    steps = _steps(c, m.get("steps"), f"{where}.steps", bool(records), m.line_of("steps"))
    depends = c.get(m, "depends_on", where, list, [], hint="a list of service names") or []
    groups = {v.group for v in volumes if v.group}
    if len(groups) > 1:
        c.err(m, "volumes", where, f"the volumes of one service are captured in one consistency "
                                   f"group; they name several ({', '.join(sorted(groups))})")
    svc = Service(name, str(m.get("primary", "")), str(m.get("replica", "")), tuple(volumes),
                  rep["mode"], rep["rate"], rep["rpo"], automatic, float(grace), float(damping),
                  loss, tuple(records), steps, tuple(depends), rep["level"], rep["cp_interval"],
                  rep["journal_limit"], rep["apply_interval"], rep["export"],
                  verify_rate=rep["verify_rate"], export_tls=rep["export_tls"],
                  export_operators=rep["export_operators"])
    svc = _drain(c, f, fw, m.get("steps"), svc)
    if volumes:
        _data_path(c, m, where, svc, sites)
    return svc


def _drain(c: _Checker, f: LineDict, fw: str, raw_steps: Any, svc: Service) -> Service:
    """How long a switchover drains: ``wait_replication``'s timeout where the steps list one,
    else ``failover.drain_timeout`` (default 120 s); given in both places, an error."""
    drain = c.get(f, "drain_timeout", fw, (int, float), None, check=lambda v: v > 0,
                  hint="seconds > 0")
    waits = [s for s in raw_steps or [] if isinstance(s, LineDict)
             and s.get("type") == StepType.WAIT_REPLICATION.value]
    if waits and "timeout" in waits[0]:
        if drain is not None:
            c.err(f, "drain_timeout", fw, "the drain's timeout is given twice: here and as "
                                          "the wait_replication step's timeout (keep one)")
        return dataclasses.replace(svc, drain_timeout=float(waits[0]["timeout"]))
    drain = float(drain or 120)
    steps = tuple(dataclasses.replace(s, timeout=drain) if s.type is StepType.WAIT_REPLICATION
                  else s for s in svc.steps)
    return dataclasses.replace(svc, drain_timeout=drain, steps=steps)


def _replication(c: _Checker, m: Any, where: str, sites: dict[str, Site]) -> dict[str, Any]:
    """The service's ``replication:`` block (every field configures the data path)."""
    from replicator.errors import UsageError
    from replicator.units import parse_rate, parse_size

    rw = f"{where}.replication"
    r = c.mapping(m.get("replication") or LineDict(), rw,
                  {"mode", "rate_limit", "rpo", "compression", "cp_interval", "journal_limit",
                   "apply_interval", "export", "verify_rate", "export_tls", "export_allow"},
                  set())
    mode = c.get(r, "mode", rw, str, "hot", check=lambda v: v in ("hot", "warm"),
                 hint="hot or warm")
    rate = None
    if "rate_limit" in r:
        text = str(r["rate_limit"])
        try:
            rate = parse_rate(text)
        except UsageError as exc:
            c.err(r, "rate_limit", rw, str(exc))
        if rate is not None and rate < MIN_RATE_LIMIT:
            number = re.match(r"\s*(\d+(?:\.\d+)?)", text)
            c.err(r, "rate_limit", rw, f"{text!r} is {rate} bytes/s, below the 64KiB/s minimum: "
                                       "a cap that low is almost certainly a unit mistake (did "
                                       f"you mean {number.group(1) if number else 20}MB/s?)")
            rate = None
    rpo = c.get(r, "rpo", rw, (int, float), 30, check=lambda v: v > 0, hint="seconds > 0")
    level = c.get(r, "compression", rw, (int, str), 1,
                  check=lambda v: v in ("zstd", "none") or (isinstance(v, int) and 0 <= v <= 22),
                  hint="zstd, none or a zstd level 0..22")
    level = {"zstd": 1, "none": 0}.get(level, level) if isinstance(level, str) else level
    cp_interval = c.get(r, "cp_interval", rw, (int, float), 0.0, check=lambda v: v >= 0,
                        hint="seconds >= 0 (0: cut as soon as the points before are sent)")
    journal_limit = 1 << 30
    if "journal_limit" in r:
        try:
            journal_limit = parse_size(str(r["journal_limit"]))
            if journal_limit < 1 << 20:
                raise UsageError("at least 1MiB")
        except UsageError as exc:
            c.err(r, "journal_limit", rw, str(exc))
    verify_rate = _verify_rate(c, r, rw)
    apply_interval = c.get(r, "apply_interval", rw, (int, float), None, check=lambda v: v > 0,
                           hint="seconds > 0")
    if apply_interval is not None and mode != "warm":
        c.err(r, "apply_interval", rw, "only a warm replica applies on a schedule (mode: warm)")
    export = _export(c, r, rw, sites)
    export_tls = c.get(r, "export_tls", rw, bool, False, hint="true or false")
    if export_tls and not export and "export" not in r:
        c.err(r, "export_tls", rw, "TLS on the NBD export needs an export (replication.export)")
    return {"mode": mode, "rate": rate, "rpo": float(rpo), "level": int(level),
            "cp_interval": float(cp_interval), "journal_limit": journal_limit,
            "apply_interval": float(apply_interval) if apply_interval else None,
            "export": export, "verify_rate": verify_rate, "export_tls": bool(export_tls),
            "export_operators": _export_allow(c, r, rw, bool(export_tls))}


def _export_allow(c: _Checker, r: Any, rw: str, tls: bool) -> tuple[str, ...]:
    """``replication.export_allow``: ``[operator:NAME, ...]``, the operators who may attach to
    the TLS export besides its own site (``push --nbd-allow``, the same parser)."""
    from replicator.capture.nbdtls import parse_allow
    from replicator.errors import UsageError

    items = c.get(r, "export_allow", rw, list, [], hint="a list of operator:NAME") or []
    if not items:
        return ()
    if not tls:
        c.err(r, "export_allow", rw, "names who may attach to the export over TLS: it needs "
                                     "export_tls: true")
        return ()
    try:
        return tuple(sorted(parse_allow(str(i) for i in items)))
    except UsageError as exc:
        c.err(r, "export_allow", rw, str(exc).removeprefix("--nbd-allow "))
        return ()


def _verify_rate(c: _Checker, r: Any, rw: str) -> int:
    """``replication.verify_rate``: the capture agent's background verify, bytes/s (0: off)."""
    from replicator.errors import UsageError
    from replicator.units import parse_verify_rate

    if "verify_rate" not in r:
        return VERIFY_RATE
    value = r["verify_rate"]
    if value is False:  # YAML 1.1 reads a bare `off` (or `false`, `no`) as false
        return 0
    try:
        return parse_verify_rate(str(value))
    except UsageError as exc:
        c.err(r, "verify_rate", rw, str(exc))
        return VERIFY_RATE


def _export(c: _Checker, r: Any, rw: str, sites: dict[str, Site]) -> dict[str, str]:
    """``replication.export``: where the application reaches the volumes (NBD) at each site."""
    export: dict[str, str] = {}
    if "export" in r:
        raw_export = r["export"]
        if isinstance(raw_export, str):
            if not _hostport(raw_export):
                c.err(r, "export", rw, f"{raw_export!r} is not HOST:PORT")
                return {}
            export = {n: raw_export for n in sites}
        elif isinstance(raw_export, dict) and all(isinstance(v, str) for v in raw_export.values()):
            export = {str(k): v for k, v in raw_export.items()}
            for k in export:
                if k not in sites:
                    c.err(raw_export, k, f"{rw}.export", f"unknown site {k!r}")
        else:
            c.err(r, "export", rw, "expected HOST:PORT (the same at every site) or a mapping "
                                   "of site: HOST:PORT")
        for k, v in export.items():
            if not _hostport(v):
                c.err(r, "export", rw, f"{k}: {v!r} is not HOST:PORT")
    return export


def _hostport(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _data_path(c: _Checker, m: Any, where: str, svc: Service, sites: dict[str, Site]) -> None:
    """A service with volumes is replicated by the site agents: each of its sites needs what
    the agent runs there (its data directory, its replication target, the application's
    export)."""
    for role in ("primary", "replica"):
        site = sites.get(getattr(svc, role))
        if site is None:
            continue
        sw = f"sites.{site.name}"
        missing = [what for what, field, ok in (
            ("data_dir", f"{sw}.data_dir", site.data_dir),
            ("endpoints.replication", f"{sw}.endpoints", site.endpoints.get("replication")),
            (f"{where}.replication.export", f"{where}.replication.export",
             svc.export.get(site.name))) if not ok and field not in c.fields]
        if missing:
            c.err(m, "volumes", where, f"site {site.name} lacks {', '.join(missing)}: its agent "
                                       "cannot run this service's replication")
        elif not _hostport(site.endpoints["replication"]):
            c.err(m, "volumes", where, f"site {site.name}: endpoints.replication "
                                       f"{site.endpoints['replication']!r} is not HOST:PORT")


def _steps(c: _Checker, node: Any, where: str, has_dns: bool,
           line: int) -> tuple[Step, ...]:
    if not isinstance(node, list) or not node:
        c.errors.append(f"{c.path}:{line}: {where}: expected a non-empty list of steps")
        return ()
    out = []
    places: list[int] = []  # each step's index in the list (an invalid one is left out)
    for i, s in enumerate(node):
        sw = f"{where}[{i}]"
        if not isinstance(s, LineDict) or "type" not in s:
            c.errors.append(f"{c.path}:{getattr(s, 'line', 0)}: {sw}: a step needs a type: "
                            f"({', '.join(t.value for t in StepType)})")
            continue
        try:
            stype = StepType(s["type"])
        except ValueError:
            c.err(s, "type", sw, f"unknown step type {s['type']!r} (one of "
                                 f"{', '.join(t.value for t in StepType)})")
            continue
        c.mapping(s, sw, {"type", "name"} | _STEP_FIELDS[stype], set())
        step = _step(c, s, sw, stype)
        if step is not None:
            out.append(step)
            places.append(i)
    # the order the steps run in, and what runs once (failover/steps.py)
    for index, message in step_problems([s.spec() for s in out], has_dns):
        if index is None:
            c.errors.append(f"{c.path}:{line}: {where}: {message}")
        else:
            c.errors.append(f"{c.path}:{out[index].line}: {where}[{places[index]}]: {message}")
    return tuple(out)


def _step(c: _Checker, s: LineDict, sw: str, stype: StepType) -> Step | None:
    name = c.get(s, "name", sw, str, stype.value)
    timeout = c.get(s, "timeout", sw, (int, float), 30, check=lambda v: v > 0,
                    hint="seconds > 0")
    if stype is StepType.HOOK:
        if "run" not in s:
            c.err(s, None, sw, "missing required key 'run'")
        on = c.get(s, "at", sw, str, "controller", check=lambda v: v in set(Where),
                   hint="old_primary, new_primary or controller")
        return Step(stype, name, s.line, run=s.get("run"), on=Where(on), timeout=timeout)
    if stype is StepType.PRECHECK:
        check = c.get(s, "check", sw, str, None, check=lambda v: v in _CHECKS,
                      hint=" or ".join(sorted(_CHECKS)))
        if "check" not in s:
            c.err(s, None, sw, "missing required key 'check'")
        return Step(stype, name, s.line, check=check)
    if stype is StepType.HEALTH_CHECK:
        probes = [k for k in ("http", "tcp", "command") if k in s]
        if len(probes) != 1:
            c.err(s, None, sw, "give exactly one of http:, tcp: or command:")
        retries = c.get(s, "retries", sw, int, 0, check=lambda v: v >= 0, hint="an integer >= 0")
        interval = c.get(s, "interval", sw, (int, float), 1, check=lambda v: v > 0,
                         hint="seconds > 0")
        return Step(stype, name, s.line, http=s.get("http"), tcp=s.get("tcp"),
                    command=s.get("command"), timeout=timeout, retries=retries,
                    interval=interval)
    return Step(stype, name, s.line, timeout=timeout)


def _dependencies(c: _Checker, node: Any, services: dict[str, Service]) -> None:
    for name, svc in services.items():
        for dep in svc.depends_on:
            if dep not in services:
                c.errors.append(f"{c.path}:{_line(node, name)}: services.{name}.depends_on: "
                                f"unknown service {dep!r}")
    seen: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        if seen.get(n) == 2 or n not in services:
            return
        if seen.get(n) == 1:
            cycle = " -> ".join([*stack[stack.index(n):], n])
            c.errors.append(f"{c.path}:{_line(node, n)}: services.{n}.depends_on: dependency "
                            f"cycle {cycle}")
            return
        seen[n] = 1
        for d in services[n].depends_on:
            visit(d, [*stack, n])
        seen[n] = 2

    for n in services:
        visit(n, [])


def _site_modes(c: _Checker, node: Any, services: dict[str, Service]) -> None:
    """A site runs one replication target daemon, in one mode: every service with volumes
    at a site (as its primary or its replica) must use the same ``replication.mode``. The
    first such service (in file order) sets the site's mode; each one that differs is an
    error."""
    first: dict[str, Service] = {}
    for name, svc in services.items():
        if not svc.volumes:
            continue  # no data path: its mode configures nothing
        m = node.get(name) if isinstance(node, LineDict) else None
        r = m.get("replication") if isinstance(m, LineDict) else None
        if isinstance(r, LineDict) and r.get("mode", svc.mode) != svc.mode:
            continue  # an invalid mode, already reported
        clashes: dict[str, list[str]] = {}
        for site in (svc.primary, svc.replica):
            other = first.setdefault(site, svc)
            if other.mode != svc.mode:
                clashes.setdefault(f"{other.name} ({other.mode})", []).append(site)
        if clashes:
            line = (r.line_of("mode") if isinstance(r, LineDict) else
                    m.line_of("replication") if isinstance(m, LineDict) else 0)
            shared = "; ".join(f"site{'s' if len(s) > 1 else ''} {', '.join(s)} with {other}"
                               for other, s in clashes.items())
            c.errors.append(
                f"{c.path}:{line}: services.{name}.replication.mode: {svc.mode}, but it shares "
                f"{shared}: a site runs one replication target daemon, in one mode (hot or "
                "warm), so the services with volumes at a site must use the same mode")


def _line(node: Any, key: str) -> int:
    return node.line_of(key) if isinstance(node, LineDict) else 0
