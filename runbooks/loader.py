"""Load and validate a runbook, collecting *every* error as ``file:line: field: message``.

Every value is read through the typed accessors of ``runbooks.checker.Checker``: a value of
the wrong type is one error at the line of that value, and the loader goes on with the
field's default, never a Python exception. A field whose value was refused is not reported
again by the checks that use it (an unknown site named by a service when ``sites:`` itself
is unusable, the step order when a step could not be read). The ``replication:`` block and
the data path it configures are read by runbooks/replication_fields.py."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import yaml

from drctl.words import closest
from drctl.yamlstrict import LineDict, yaml_error_line, yaml_problem
from failover.coordination import credentials
from failover.coordination.credentials import EtcdCredentials
from failover.steps import problems as step_problems
from runbooks.checker import MISSING, Checker, got, names
from runbooks.model import (
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
from runbooks.replication_fields import data_path, replication
from runbooks.yamlnodes import DuplicateKey, Sequence, load_yaml, value_line

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
_STEP_TYPES = ", ".join(t.value for t in StepType)
_CHECKS = {"replication_lag", "sites_reachable"}
_TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512")
# replication: the site's target daemon (HOST:PORT); health: a witness URL; source_metrics:
# the metrics endpoint of a source agent the site does not run itself (hook-driven sites);
# target_metrics: the metrics port the site agent gives its target daemon (HOST:PORT)
_ENDPOINTS = {"replication", "health", "source_metrics", "target_metrics"}


def load(path: str) -> Runbook:
    try:
        raw = load_yaml(path)
    except OSError as exc:
        raise RunbookError(path, [f"{path}: cannot read: {exc.strerror}"]) from None
    except DuplicateKey as exc:
        raise RunbookError(path, [f"{path}:{yaml_error_line(exc) or 1}: {exc.problem}: a key "
                                  "is given once in a mapping"]) from None
    except yaml.YAMLError as exc:
        raise RunbookError(path, [f"{path}:{yaml_error_line(exc) or 0}: not valid YAML: "
                                  f"{yaml_problem(exc, path)}"]) from None
    if not isinstance(raw, LineDict) or "kind" not in raw:  # one line, not every key's error
        raise RunbookError(path, [f"{path}:1: not a drctl runbook (no 'kind: {KIND}')"])
    if raw["kind"] != KIND:
        c = Checker(path)
        c.bad(raw, "kind", "", f"not a drctl runbook: {got(raw['kind'])} (expected {KIND})")
        raise RunbookError(path, c.errors)
    c = Checker(path)
    rb = _runbook(c, raw)
    if c.errors:
        raise RunbookError(path, c.errors)
    return rb


def _runbook(c: Checker, top: LineDict) -> Runbook:
    c.keys(top, "", {"kind", "version", "cluster", "etcd", "lease_ttl", "sites", "dns",
                     "services"}, {"kind", "version", "cluster", "etcd", "sites", "services"})
    c.whole(top, "version", "", "1: only version 1 is understood", 1, check=lambda v: v == 1)
    cluster = c.text(top, "cluster", "", "a name", check=bool)
    etcd, etcd_credentials = _etcd(c, top)
    ttl = c.whole(top, "lease_ttl", "", "whole seconds >= 1", 2, check=lambda v: v >= 1)
    sites = _sites(c, top)
    zones = _zones(c, top)
    services = _services(c, top, sites, zones)
    _dependencies(c, top, services)
    _site_modes(c, top, services)
    return Runbook(c.path, cluster or "", etcd, ttl, sites, zones, services, etcd_credentials)


def _beside(runbook: str, path: str) -> str:
    """A key or credential file named in a runbook: relative to the runbook's directory (so a
    runbook reads the same files whatever the current directory is)."""
    return path if os.path.isabs(path) else os.path.join(
        os.path.dirname(os.path.abspath(runbook)), path)


def _etcd_endpoint(text: str) -> str | None:
    """What is wrong with an etcd endpoint (None: nothing): HOST:PORT as every address flag
    takes it (drctl/argtypes.py: a port, IPv6 in brackets, no spaces, no scheme)."""
    from drctl.argtypes import AddressError, parse_hostport

    if "://" in text:
        return _server(text)  # "expected HOST:PORT, without a scheme"
    if text != text.strip():
        return f"invalid address {text!r}: spaces around it"
    try:
        parse_hostport(text)
    except AddressError as exc:
        return str(exc)
    return None


def _hostports(c: Checker, node: Any, key: str, where: str, hint: str,
               problem: Callable[[str], str | None]) -> list[str] | None:
    """A non-empty list of HOST:PORT: an item of another type is an error of its own, the
    addresses that are text but not HOST:PORT one error for the list (at the first one),
    saying what is wrong with each ("invalid address 'http://...': expected HOST:PORT,
    without a scheme")."""
    items = c.texts(node, key, where, hint, "HOST:PORT", nonempty=True)
    if items is None:
        return None
    bad = [(i, why) for i, v in items if (why := problem(v)) is not None]
    if bad:
        c.report(value_line(node[key], bad[0][0]), c.field(node, key, where),
                 "; ".join(why for _, why in bad))
    return [v for _, v in items]


def _etcd(c: Checker, top: LineDict) -> tuple[tuple[str, ...], EtcdCredentials]:
    """``etcd:``: a list of HOST:PORT, or a mapping with endpoints: and the credentials
    (user:, password_file: or password_env:, ca:, cert:, key:). Their files are read when the
    runbook is used (runbooks/cluster.py), not when it is validated."""
    hint = "a list of HOST:PORT or a mapping with endpoints:"
    value = top.get("etcd", MISSING)
    if value is MISSING:
        return (), EtcdCredentials()
    if isinstance(value, list):
        hosts = _hostports(c, top, "etcd", "", "a list of HOST:PORT", _etcd_endpoint)
        return tuple(hosts or ()), EtcdCredentials()
    if not isinstance(value, LineDict):
        c.wrong(top, "etcd", "", hint)
        return (), EtcdCredentials()
    # the types first, as everywhere; then the rules between the fields (shared with the
    # cluster configuration), unless a field they judge was refused already
    if "endpoints" in value:
        _hostports(c, value, "endpoints", "etcd", "a list of HOST:PORT", _etcd_endpoint)
    for name in credentials.FIELDS[1:]:
        c.text(value, name, "etcd", "a path" if name in ("password_file", "ca", "cert", "key")
               else "a name", check=bool)
    typed = not any(c.reported(f"etcd.{k}") for k in credentials.FIELDS[1:])
    endpoints, creds, problems = credentials.parse(value)

    def near(v: str | None) -> str | None:
        return _beside(c.path, v) if v else v

    creds = dataclasses.replace(creds, password_file=near(creds.password_file),
                                ca=near(creds.ca), cert=near(creds.cert), key=near(creds.key))
    for key, message in problems:
        if key == "endpoints" and "endpoints" in value:
            continue  # reported above, with the item's line
        if key in credentials.FIELDS and not typed:
            continue  # a follow-on of a refused field
        c.err(value, key, "etcd", message)
    return tuple(str(e) for e in endpoints if isinstance(e, str)), creds


def _sites(c: Checker, top: LineDict) -> dict[str, Site]:
    out: dict[str, Site] = {}
    m = c.block(top, "sites", "", "a mapping of site name: site", None)
    if m is None:
        c.sites = None if "sites" in top else set()
        return out
    c.sites = set(names(m))
    if not m:
        c.bad(top, "sites", "", "declare at least two sites")
    for name in names(m):
        where = f"sites.{name}"
        sm = c.block(m, name, "sites", "a mapping with address: (and data_dir:, endpoints:)",
                     {"address", "endpoints", "data_dir"}, {"address"})
        if sm is None:
            continue
        endpoints: dict[str, str] = {}
        e = c.block(sm, "endpoints", where, "a mapping of name: URL or HOST:PORT", None)
        for key in names(e or LineDict()):
            if key not in _ENDPOINTS:
                c.err(e, key, f"{where}.endpoints", "unknown endpoint (known: "
                      f"{', '.join(sorted(_ENDPOINTS))})")
                continue
            url = c.text(e, key, f"{where}.endpoints", "a URL or HOST:PORT", check=bool)
            if url is not None:
                endpoints[key] = url
        data_dir = c.text(sm, "data_dir", where, "an absolute path",
                          check=lambda v: v.startswith("/"))
        address = c.text(sm, "address", where, "a host name or an IP address (no port, no "
                         "brackets)", check=_site_address)
        out[name] = Site(name, address or "", endpoints, data_dir)
    return out


def _zones(c: Checker, top: LineDict) -> dict[str, Zone]:
    out: dict[str, Zone] = {}
    d = c.block(top, "dns", "", "a mapping with zones:", {"zones"}, optional=True)
    zones = c.block(d, "zones", "dns", "a mapping of zone name: zone", None,
                    optional=True) if d else None
    if zones is None:
        c.zones = None if "dns" in top and (d is None or "zones" in d) else set()
        return out
    c.zones = set(names(zones))
    for zname in names(zones):
        where = f"dns.zones.{zname}"
        zm = c.block(zones, zname, "dns.zones", "a mapping with servers: and tsig:",
                     {"servers", "update", "tsig", "verify_timeout"}, {"servers", "tsig"})
        if zm is None:
            continue
        servers = _hostports(c, zm, "servers", where, "a list of HOST:PORT", _server) or []
        update = servers
        if "update" in zm:
            update = _hostports(c, zm, "update", where, "a list of HOST:PORT", _server) or []
        tw = f"{where}.tsig"
        t = c.block(zm, "tsig", where, "a mapping with name: and file: or env:",
                    {"name", "file", "env", "algorithm", "secret"}, {"name"})
        if t is None:
            continue
        if "secret" in t:
            c.err(t, "secret", tw, "inline secrets are not allowed: give file: (a "
                                   "tsig-keygen key file) or env: (a variable)")
        elif ("file" in t) == ("env" in t):
            c.err(t, None, tw, "give exactly one of file: or env:")
        key_file = c.text(t, "file", tw, "the path of a tsig-keygen key file", check=bool)
        env = c.text(t, "env", tw, "the name of an environment variable", check=bool)
        algorithm = c.text(t, "algorithm", tw, " or ".join(_TSIG_ALGORITHMS),
                           check=lambda v: v in _TSIG_ALGORITHMS)
        verify = c.number(zm, "verify_timeout", where, "seconds > 0", 10.0,
                          check=lambda v: v > 0)
        out[zname] = Zone(zname, tuple(servers), tuple(update),
                          c.text(t, "name", tw, "the key's name", check=bool) or "",
                          _beside(c.path, key_file) if key_file else None, env, algorithm,
                          verify)
    return out


def _server(text: str) -> str | None:
    """What is wrong with a HOST[:PORT] (None: nothing)."""
    from failover.dns.rfc2136 import Server

    try:
        Server.parse(text)
    except ValueError as exc:  # a URL, a port out of range
        return str(exc)
    return None


def _services(c: Checker, top: LineDict, sites: dict[str, Site],
              zones: dict[str, Zone]) -> dict[str, Service]:
    out = {}
    m = c.block(top, "services", "", "a mapping of service name: service", None)
    c.services = set(names(m or LineDict()))
    for name in names(m or LineDict()):
        svc = _service(c, m, name, sites, zones)
        if svc is not None:
            out[name] = svc
    return out


def _site(c: Checker, m: LineDict, role: str, where: str, sites: dict[str, Site]) -> str:
    known = f" ({', '.join(sorted(c.sites))})" if c.sites else ""
    name = c.text(m, role, where, f"a site name{known}", check=bool)
    if name is not None and c.sites is not None and name not in c.sites:
        c.bad(m, role, where, f"unknown site {name!r} (sites: {', '.join(sorted(sites))})")
    return name or ""


def _service(c: Checker, services: Any, name: str, sites: dict[str, Site],
             zones: dict[str, Zone]) -> Service | None:
    where = f"services.{name}"
    m = c.block(services, name, "services", "a mapping with primary:, replica: and steps:",
                {"primary", "replica", "volumes", "replication", "failover", "dns", "steps",
                 "depends_on"}, {"primary", "replica", "steps"})
    if m is None:
        return None
    primary = _site(c, m, "primary", where, sites)
    replica = _site(c, m, "replica", where, sites)
    if primary and primary == replica:
        c.bad(m, "replica", where, "must differ from primary")
    volumes = _volumes(c, m, where)
    rep = replication(c, m, where, sites)
    fw = f"{where}.failover"
    f = c.block(m, "failover", where, "a mapping (automatic:, grace:, damping:...)",
                {"automatic", "grace", "damping", "allow_data_loss", "drain_timeout"},
                optional=True)
    f = f if f is not None else LineDict()
    automatic = c.flag(f, "automatic", fw, True)
    grace = c.number(f, "grace", fw, "seconds >= 0", 4.0, check=lambda v: v >= 0)
    damping = c.number(f, "damping", fw, "seconds >= 0", 600.0, check=lambda v: v >= 0)
    loss = c.flag(f, "allow_data_loss", fw, False)
    records = _records(c, m, where)
    # dns: refused: the steps' dns checks would only repeat it
    has_dns = bool(records) if "dns" not in m or not c.reported(f"{where}.dns") else None
    steps = _steps(c, m, where, has_dns)
    depends = c.texts(m, "depends_on", where, "a list of service names", "a service name")
    c.depends[name] = (m.get("depends_on"), depends or [])
    groups = {v.group for v in volumes if v.group}
    if len(groups) > 1:
        c.err(m, "volumes", where, f"the volumes of one service are captured in one consistency "
                                   f"group; they name several ({', '.join(sorted(groups))})")
    svc = Service(name, primary, replica, tuple(volumes),
                  rep["mode"], rep["rate"], rep["rpo"], automatic, grace, damping,
                  loss, tuple(records), steps, tuple(d for _, d in depends or []), rep["level"],
                  rep["cp_interval"], rep["journal_limit"], rep["apply_interval"], rep["export"],
                  verify_rate=rep["verify_rate"], export_tls=rep["export_tls"],
                  export_operators=rep["export_operators"])
    svc = _drain(c, f, fw, m.get("steps"), svc)
    if volumes:
        data_path(c, m, where, svc, sites)
    return svc


def _volumes(c: Checker, m: LineDict, where: str) -> list[Volume]:
    return [Volume(c.text(v, "name", w, "a volume name", check=bool) or "",
                   c.text(v, "path", w, "a path", check=bool) or "",
                   c.text(v, "group", w, "a consistency group name", check=bool))
            for w, v in c.each(m, "volumes", where, "a list of volumes (name:, path:)",
                               "a volume: a mapping with name: and path:",
                               {"name", "path", "group"}, {"name", "path"})]


def _records(c: Checker, m: LineDict, where: str) -> list[DnsRecord]:
    records = []
    for dw, d in c.each(m, "dns", where, "a list of records (zone:, name:...)",
                        "a record: a mapping with zone: and name:",
                        {"zone", "name", "type", "ttl"}, {"zone", "name"}):
        zone = c.text(d, "zone", dw, "a zone declared under dns.zones", check=bool)
        if zone is not None and c.zones is not None and zone not in c.zones:
            c.bad(d, "zone", dw, f"zone {zone!r} is not declared under dns.zones")
        rtype = c.text(d, "type", dw, "A, AAAA or CNAME",
                       check=lambda v: v in ("A", "AAAA", "CNAME")) or "A"
        ttl = c.whole(d, "ttl", dw, "seconds in 1..86400", 30, check=lambda v: 0 < v <= 86400)
        records.append(DnsRecord(zone or "", c.text(d, "name", dw, "a record name",
                                                     check=bool) or "", rtype, ttl))
    return records


def _drain(c: Checker, f: LineDict, fw: str, raw_steps: Any, svc: Service) -> Service:
    """How long a switchover drains: ``wait_replication``'s timeout where the steps list one,
    else ``failover.drain_timeout`` (default 120 s); given in both places, an error."""
    drain = c.number(f, "drain_timeout", fw, "seconds > 0", 120.0, check=lambda v: v > 0)
    waits = [s for s in raw_steps if isinstance(s, LineDict)
             and s.get("type") == StepType.WAIT_REPLICATION.value] \
        if isinstance(raw_steps, list) else []
    if waits and "timeout" in waits[0]:
        if "drain_timeout" in f:
            c.err(f, "drain_timeout", fw, "the drain's timeout is given twice: here and as "
                                          "the wait_replication step's timeout (keep one)")
        wait = next((s for s in svc.steps if s.type is StepType.WAIT_REPLICATION), None)
        return dataclasses.replace(svc, drain_timeout=wait.timeout if wait else drain)
    steps = tuple(dataclasses.replace(s, timeout=drain) if s.type is StepType.WAIT_REPLICATION
                  else s for s in svc.steps)
    return dataclasses.replace(svc, drain_timeout=drain, steps=steps)



def _steps(c: Checker, m: LineDict, where: str, has_dns: bool | None) -> tuple[Step, ...]:
    sw = f"{where}.steps"
    node = c.items(m, "steps", where, "a non-empty list of steps", nonempty=True)
    if node is None:
        return ()
    out = []
    places: list[int] = []  # each step's index in the list (an invalid one is left out)
    complete = True
    for i in range(len(node)):
        kind = _step_type(c, node, i, sw)
        if kind is None:
            complete = False
            continue
        s = node[i]
        c.keys(s, f"{sw}[{i}]", {"type", "name"} | _STEP_FIELDS[kind], set())
        step = _step(c, s, f"{sw}[{i}]", kind)
        if step is None:
            complete = False
        else:
            out.append(step)
            places.append(i)
    if not complete:  # the order of steps some of which could not be read: not checked
        return tuple(out)
    if has_dns is None:  # the records could not be read: whether they need a dns step neither
        has_dns = any(s.type is StepType.DNS for s in out)
    # the order the steps run in, and what runs once (failover/steps.py)
    for index, message in step_problems([s.spec() for s in out], has_dns):
        if index is None:
            c.bad(m, "steps", where, message)
        else:
            c.report(out[index].line, f"{sw}[{places[index]}]", message)
    return tuple(out)


def _step_type(c: Checker, node: Sequence, i: int, sw: str) -> StepType | None:
    """The type of the ``i``th step (None: not a step, or its type is not known)."""
    s = c.block(node, i, sw, f"a step: a mapping with type: ({_STEP_TYPES})", None)
    if s is None:
        return None
    if "type" not in s:
        c.err(s, None, f"{sw}[{i}]", f"a step needs a type: ({_STEP_TYPES})")
        return None
    if isinstance(s["type"], str) and s["type"] not in set(StepType):
        near = closest(s["type"], (t.value for t in StepType))
        mean = f"; did you mean {near!r}?" if near else ""
        c.bad(s, "type", f"{sw}[{i}]", f"unknown step type {s['type']!r}{mean} (one of "
                                       f"{_STEP_TYPES})")
        return None
    stype = c.text(s, "type", f"{sw}[{i}]", f"a step type: one of {_STEP_TYPES}")
    return None if stype is None else StepType(stype)


def _step(c: Checker, s: LineDict, sw: str, stype: StepType) -> Step | None:
    """The step (None: where it runs is unknown, it is left out of the order checks)."""
    name = c.text(s, "name", sw, "a name", check=bool) or stype.value
    timeout = 30.0
    if "timeout" in _STEP_FIELDS[stype]:
        timeout = c.number(s, "timeout", sw, "seconds > 0", 30.0, check=lambda v: v > 0)
    if stype is StepType.HOOK:
        if "run" not in s:
            c.err(s, None, sw, "missing required key 'run'")
        run = c.text(s, "run", sw, "a shell command", check=bool)
        on = c.text(s, "at", sw, "old_primary, new_primary or controller",
                    check=lambda v: v in set(Where))
        if "at" in s and on is None:
            return None
        return Step(stype, name, s.line, run=run, on=Where(on or Where.CONTROLLER),
                    timeout=timeout)
    if stype is StepType.PRECHECK:
        check = c.text(s, "check", sw, " or ".join(sorted(_CHECKS)),
                       check=lambda v: v in _CHECKS)
        if "check" not in s:
            c.err(s, None, sw, "missing required key 'check'")
        return Step(stype, name, s.line, check=check)
    if stype is StepType.HEALTH_CHECK:
        if len([k for k in ("http", "tcp", "command") if k in s]) != 1:
            c.err(s, None, sw, "give exactly one of http:, tcp: or command:")
        return Step(stype, name, s.line,
                    http=c.text(s, "http", sw, "an http:// or https:// URL (its host may be "
                                "{site_address})", check=_check_url),
                    tcp=c.text(s, "tcp", sw, "HOST:PORT (HOST may be {site_address})",
                               check=_check_tcp),
                    command=c.text(s, "command", sw, "a shell command ($DRCTL_SITE_ADDRESS, "
                                   "not {site_address}, is the checking site's address)",
                                   check=lambda v: bool(v) and "{site_address}" not in v),
                    timeout=timeout,
                    retries=c.whole(s, "retries", sw, "a whole number >= 0", 0,
                                    check=lambda v: v >= 0),
                    interval=c.number(s, "interval", sw, "seconds > 0", 1.0,
                                      check=lambda v: v > 0))
    return Step(stype, name, s.line, timeout=timeout)


def _site_address(text: str) -> bool:
    """A host name or an IP address as a site's address: checks put it in URLs and HOST:PORT
    ({site_address}), DNS records name it."""
    import ipaddress
    import re

    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", text) is not None \
            and ".." not in text


def _placeholders_ok(text: str) -> bool:
    """Braces only as {site_address} (failover/steprun.py expands it where the check runs)."""
    from failover.steprun import SITE_ADDRESS

    rest = text.replace(SITE_ADDRESS, "")
    return "{" not in rest and "}" not in rest


def _check_url(text: str) -> bool:
    """An http(s) URL with a host and, if given, a numeric port, whatever address
    {site_address} stands for (IPv4 or IPv6: expand() brackets the latter itself)."""
    from urllib.parse import urlsplit

    from failover.steprun import SITE_ADDRESS, expand

    if not (text.startswith(("http://", "https://")) and _placeholders_ok(text)) or \
            f"[{SITE_ADDRESS}]" in text:
        return False
    for sample in ("192.0.2.1", "2001:db8::1"):
        try:
            parts = urlsplit(expand(text, {"DRCTL_SITE_ADDRESS": sample}))
            if not parts.hostname:
                return False
            parts.port  # noqa: B018 (a port that is not a number raises)
        except ValueError:
            return False
    return True


def _check_tcp(text: str) -> bool:
    from failover.steprun import SITE_ADDRESS

    return (_placeholders_ok(text) and ":" in text and f"[{SITE_ADDRESS}]" not in text
            and _server(text.replace(SITE_ADDRESS, "127.0.0.1")) is None)


def _dependencies(c: Checker, top: LineDict, services: dict[str, Service]) -> None:
    for name in services:
        node, items = c.depends.get(name, (None, []))
        for i, dep in items:
            if dep not in c.services:  # a service declared but invalid: reported already
                c.bad(node, i, f"services.{name}.depends_on",
                      f"unknown service {dep!r} (services: {', '.join(sorted(c.services))})")
    seen: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        if seen.get(n) == 2 or n not in services:
            return
        if seen.get(n) == 1:
            cycle = " -> ".join([*stack[stack.index(n):], n])
            c.bad(top["services"][n], "depends_on", f"services.{n}",
                  f"dependency cycle {cycle}")
            return
        seen[n] = 1
        for d in services[n].depends_on:
            visit(d, [*stack, n])
        seen[n] = 2

    for n in services:
        visit(n, [])


def _site_modes(c: Checker, top: LineDict, services: dict[str, Service]) -> None:
    """A site runs one replication target daemon, in one mode: every service with volumes
    at a site (as its primary or its replica) must use the same ``replication.mode``. The
    first such service (in file order) sets the site's mode; each one that differs is an
    error."""
    first: dict[str, Service] = {}
    for name, svc in services.items():
        rw = f"services.{name}.replication"
        if not svc.volumes or rw in c.fields or c.reported(f"{rw}.mode"):
            continue  # no data path: its mode configures nothing; or a mode already refused
        clashes: dict[str, list[str]] = {}
        for site in (svc.primary, svc.replica):
            other = first.setdefault(site, svc)
            if other.mode != svc.mode:
                clashes.setdefault(f"{other.name} ({other.mode})", []).append(site)
        if clashes:
            m = top["services"][name]
            r = m.get("replication")
            line = (r.line_of("mode") if isinstance(r, LineDict) else m.line_of("replication"))
            shared = "; ".join(f"site{'s' if len(s) > 1 else ''} {', '.join(s)} with {other}"
                               for other, s in clashes.items())
            c.report(line, f"{rw}.mode",
                     f"{svc.mode}, but it shares {shared}: a site runs one replication target "
                     "daemon, in one mode (hot or warm), so the services with volumes at a site "
                     "must use the same mode")
