"""A service's ``replication:`` block and the data path it configures: each field of the
block (mode, rpo, compression, rate and verify limits, the NBD export and who may attach to
it), and what each site of a service with volumes needs for its agent to replicate it."""

from __future__ import annotations

import re
from typing import Any

from drctl.yamlstrict import LineDict
from runbooks.checker import MISSING, Checker, names
from runbooks.model import VERIFY_RATE, Service, Site
from runbooks.yamlnodes import value_line

# A rate cap below this is almost certainly a unit mistake ("20" or "20kB/s" for 20MB/s)
MIN_RATE_LIMIT = 64 * 1024


def replication(c: Checker, m: LineDict, where: str, sites: dict[str, Site]) -> dict[str, Any]:
    """The service's ``replication:`` block (every field configures the data path)."""
    from replicator.errors import UsageError
    from replicator.units import parse_size

    rw = f"{where}.replication"
    r = c.block(m, "replication", where, "a mapping (mode:, rpo:, export:...)",
                {"mode", "rate_limit", "rpo", "compression", "cp_interval", "journal_limit",
                 "apply_interval", "export", "verify_rate", "export_tls", "export_allow"},
                optional=True)
    r = r if r is not None else LineDict()
    mode = c.text(r, "mode", rw, "hot or warm", check=lambda v: v in ("hot", "warm")) or "hot"
    rpo = c.number(r, "rpo", rw, "seconds > 0", 30.0, check=lambda v: v > 0)
    level = c.value(r, "compression", rw, (int, str), "zstd, none or a zstd level 0..22",
                    check=lambda v: v in ("zstd", "none") or (isinstance(v, int)
                                                              and 0 <= v <= 22))
    level = {"zstd": 1, "none": 0, MISSING: 1}.get(level, level) \
        if not isinstance(level, int) else level
    cp_interval = c.number(r, "cp_interval", rw, "seconds >= 0 (0: cut as soon as the points "
                           "before are sent)", 0.0, check=lambda v: v >= 0)
    journal_limit = 1 << 30
    size = c.value(r, "journal_limit", rw, (str, int), "a size such as 4GiB")
    if size is not MISSING:
        try:
            journal_limit = parse_size(str(size))
            if journal_limit < 1 << 20:
                raise UsageError("at least 1MiB")
        except UsageError as exc:
            c.bad(r, "journal_limit", rw, str(exc))
            journal_limit = 1 << 30
    apply_interval: float | None = c.number(r, "apply_interval", rw, "seconds > 0", 0.0,
                                            check=lambda v: v > 0) or None
    if "apply_interval" in r and mode != "warm" and not c.reported(f"{rw}.mode"):
        c.bad(r, "apply_interval", rw, "only a warm replica applies on a schedule (mode: warm)")
    export = _export(c, r, rw, sites)
    export_tls = c.flag(r, "export_tls", rw, False)
    if export_tls and not export and "export" not in r:
        c.bad(r, "export_tls", rw, "TLS on the NBD export needs an export (replication.export)")
    return {"mode": mode, "rate": _rate_limit(c, r, rw), "rpo": rpo, "level": level,
            "cp_interval": cp_interval, "journal_limit": journal_limit,
            "apply_interval": apply_interval, "export": export,
            "verify_rate": _verify_rate(c, r, rw), "export_tls": export_tls,
            "export_operators": _export_allow(c, r, rw, export_tls)}


def _rate_limit(c: Checker, r: LineDict, rw: str) -> int | None:
    """``replication.rate_limit``: bytes/s, or None (no cap)."""
    from replicator.errors import UsageError
    from replicator.units import parse_rate

    value = c.value(r, "rate_limit", rw, (str, int, float), "a rate such as 50MB/s")
    if value is MISSING:
        return None
    text = str(value)
    try:
        rate = parse_rate(text)
    except UsageError as exc:
        c.bad(r, "rate_limit", rw, str(exc))
        return None
    if rate is not None and rate < MIN_RATE_LIMIT:
        number = re.match(r"\s*(\d+(?:\.\d+)?)", text)
        c.bad(r, "rate_limit", rw, f"{text!r} is {rate} bytes/s, below the 64KiB/s minimum: "
                                   "a cap that low is almost certainly a unit mistake (did "
                                   f"you mean {number.group(1) if number else 20}MB/s?)")
        return None
    return rate


def _export_allow(c: Checker, r: LineDict, rw: str, tls: bool) -> tuple[str, ...]:
    """``replication.export_allow``: ``[operator:NAME, ...]``, the operators who may attach to
    the TLS export besides its own site (``push --nbd-allow``, the same parser)."""
    from replicator.capture.nbdtls import parse_allow
    from replicator.errors import UsageError

    items = c.texts(r, "export_allow", rw, "a list of operator:NAME", "operator:NAME")
    if not items or c.reported(f"{rw}.export_allow") or c.reported(f"{rw}.export_tls"):
        return ()
    if not tls:
        c.bad(r, "export_allow", rw, "names who may attach to the export over TLS: it needs "
                                     "export_tls: true")
        return ()
    try:
        return tuple(sorted(parse_allow(v for _, v in items)))
    except UsageError as exc:
        c.bad(r, "export_allow", rw, str(exc).removeprefix("--nbd-allow "))
        return ()


def _verify_rate(c: Checker, r: LineDict, rw: str) -> int:
    """``replication.verify_rate``: the capture agent's background verify, bytes/s (0: off)."""
    from replicator.errors import UsageError
    from replicator.units import parse_verify_rate

    if r.get("verify_rate") is False:  # YAML 1.1 reads a bare `off` (or `false`, `no`) as false
        return 0
    value = c.value(r, "verify_rate", rw, (str, int, float),
                    "a rate such as 4MiB/s, or off (0)")
    if value is MISSING:
        return VERIFY_RATE
    try:
        return parse_verify_rate(str(value))
    except UsageError as exc:
        c.bad(r, "verify_rate", rw, str(exc))
        return VERIFY_RATE


def _export(c: Checker, r: LineDict, rw: str, sites: dict[str, Site]) -> dict[str, str]:
    """``replication.export``: where the application reaches the volumes (NBD) at each site."""
    export: dict[str, str] = {}
    raw = r.get("export", MISSING)
    if raw is MISSING:
        return export
    if isinstance(raw, str):
        if not _hostport(raw):
            c.bad(r, "export", rw, f"{raw!r} is not HOST:PORT")
            return {}
        return {n: raw for n in sites}
    hint = "HOST:PORT (the same at every site) or a mapping of site: HOST:PORT"
    m = c.block(r, "export", rw, hint, None)
    for k in names(m or LineDict()):
        v = c.text(m, k, f"{rw}.export", "HOST:PORT")
        if v is None:
            continue
        if c.sites is not None and k not in c.sites:
            c.err(m, k, f"{rw}.export", f"unknown site {k!r}")
        elif not _hostport(v):
            c.report(value_line(m, k), f"{rw}.export", f"{k}: {v!r} is not HOST:PORT")
        export[k] = v
    return export


def _hostport(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def data_path(c: Checker, m: LineDict, where: str, svc: Service,
               sites: dict[str, Site]) -> None:
    """A service with volumes is replicated by the site agents: each of its sites needs what
    the agent runs there (its data directory, its replication target, the application's
    export)."""
    for role in ("primary", "replica"):
        site = sites.get(getattr(svc, role))
        if site is None:
            continue
        sw = f"sites.{site.name}"
        rw = f"{where}.replication"
        missing = [what for what, fields, ok in (
            ("data_dir", (f"{sw}.data_dir",), site.data_dir),
            ("endpoints.replication", (f"{sw}.endpoints",), site.endpoints.get("replication")),
            (f"{rw}.export", (f"{rw}.export", rw), svc.export.get(site.name)))
            if not ok and not any(c.reported(f) for f in fields[:1]) and fields[-1] not in c.fields]
        target = site.endpoints.get("replication")
        ew = f"{sw}.endpoints.replication"
        if missing:
            c.err(m, "volumes", where, f"site {site.name} lacks {', '.join(missing)}: its agent "
                                       "cannot run this service's replication")
        elif target and not _hostport(target) and ew not in c.fields:  # once per site
            c.report(c.lines.get(ew, 0), ew, f"{target!r} is not HOST:PORT (the site's "
                                             f"replication target, which {where} needs)")
