"""`drctl runbook validate FILE...`, `drctl runbook plan FILE SERVICE`, `drctl runbook schema`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from drctl.words import count

if TYPE_CHECKING:
    from replicator.transport.security import ChannelSecurity
    from runbooks.model import Runbook


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    root = sub
    rb = sub.add_parser("runbook", help="validate runbooks and show failover plans")
    rsub = rb.add_subparsers(dest="runbook_cmd", required=True, metavar="COMMAND")
    v = rsub.add_parser("validate", help="report every error with file, line and field")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=cmd_validate)
    p = rsub.add_parser("plan", help="the exact steps a failover of SERVICE would run")
    p.add_argument("file")
    p.add_argument("service")
    p.add_argument("--switchover", action="store_true", help="a planned switchover instead")
    p.set_defaults(func=cmd_plan)
    d = root.add_parser("drill", help="a DR drill: clone the replica, check it, report the "
                        "RPO and the standby's step times")
    d.add_argument("service")
    d.add_argument("--runbook", "--config", dest="runbook", required=True, metavar="FILE",
                   help="the runbook (--config, as the other commands name it, works too)")
    d.add_argument("--name", help="drill name (default: drill-<random>)")
    d.add_argument("--json", action="store_true")
    d.add_argument("--tls-dir", metavar="DIR", help="the deployment's TLS directory "
                   "(default: $DRCTL_TLS_DIR, with $DRCTL_TLS_AS): the drill calls the standby's "
                   "target with a certificate of it (docs/security.md)")
    who = d.add_mutually_exclusive_group()
    who.add_argument("--operator", metavar="NAME", help="with --tls-dir: as operator NAME")
    who.add_argument("--site", metavar="NAME", help="with --tls-dir: as site NAME (one the "
                     "standby's target allows for the volumes, i.e. the primary's)")
    d.set_defaults(func=cmd_drill)

    c = rsub.add_parser("check", help="run a service's health checks (exit 0 if all pass)")
    c.add_argument("file")
    c.add_argument("service")
    c.add_argument("--site", metavar="NAME", help="as site NAME's agent runs them: "
                   "{site_address} in a check is its address (without it: the address in "
                   "$DRCTL_SITE_ADDRESS)")
    c.set_defaults(func=cmd_check)

    s = rsub.add_parser("schema", help="print the runbook JSON Schema (for editors)")
    s.set_defaults(func=cmd_schema)

    cv = rsub.add_parser("convert", help="print the runbook that does what a cluster.yaml "
                                         "does (the daemons run a cluster.yaml as it)")
    cv.add_argument("file", help="the cluster.yaml")
    cv.set_defaults(func=cmd_convert)


def _load(path: str) -> Runbook | None:
    """The runbook, or None after printing every error."""
    from runbooks.loader import RunbookError, load

    try:
        return load(path)
    except RunbookError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def _invalid() -> int:
    """The exit code of an invalid runbook: a configuration error's (docs/cli.md)."""
    from runbooks.loader import RunbookError

    return RunbookError.exit_code


def _service(rb: Runbook, name: str) -> bool:
    if name in rb.services:
        return True
    print(f"drctl: error [config]: unknown service {name!r} (services: "
          f"{', '.join(sorted(rb.services))})", file=sys.stderr)
    return False


def cmd_validate(args: argparse.Namespace) -> int:
    from runbooks.loader import RunbookError, load

    failed = 0
    for path in args.files:
        try:
            rb = load(path)
        except RunbookError as exc:
            failed += 1
            for line in exc.errors:
                print(line, file=sys.stderr)
            continue
        steps = sum(len(s.steps) for s in rb.services.values())
        print(f"{path}: ok ({count(len(rb.sites), 'site')}, "
              f"{count(len(rb.services), 'service')}, {count(steps, 'step')})")
    return _invalid() if failed else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from runbooks.plan import plan

    rb = _load(args.file)
    if rb is None:
        return _invalid()
    if not _service(rb, args.service):
        return 2
    kind = "switchover" if args.switchover else "failover"
    print(f"{kind} of {args.service} ({rb.path}):")
    for line in plan(rb, args.service, switchover=args.switchover):
        print(f"  {line}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from runbooks.convert import convert, to_yaml

    sys.stdout.write(to_yaml(convert(args.file), args.file))  # a ConfigError: exit 2
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from runbooks.schema import schema

    print(json.dumps(schema(), indent=2))
    return 0


def cmd_drill(args: argparse.Namespace) -> int:
    import asyncio

    from runbooks.drill import run_drill

    rb = _load(args.runbook)
    if rb is None:
        return _invalid()
    if not _service(rb, args.service):
        return 2
    report = asyncio.run(run_drill(rb, args.service, args.name, _drill_security(args)))
    if args.json:
        print(report.to_json())
    else:
        rpo = report.achieved_rpo_seconds
        print(f"drill {report.drill} of {report.service} at {report.standby}: "
              f"{'PASSED' if report.ok else 'FAILED'}; achieved RPO "
              f"{'unknown' if rpo is None else f'{rpo:.2f}s'}, standby steps "
              f"{report.rto_seconds:.2f}s (the RTO without detection and fencing)")
        for s in report.steps:
            print(f"  {'ok ' if s.ok else 'FAIL'} {s.seconds:7.3f}s  {s.name}: {s.detail}")
    return 0 if report.ok else 1


def _drill_security(args: argparse.Namespace) -> ChannelSecurity | None:
    """--operator or --site, of --tls-dir (default $DRCTL_TLS_DIR), each defaulting as the
    replicate commands' do (replicator/cli_security.py); None (no flags): $DRCTL_TLS_DIR and
    $DRCTL_TLS_AS, as a drill the API starts."""
    import os

    from drctl.pki import Identity
    from replicator.cli_security import identity
    from replicator.errors import UsageError
    from replicator.transport.security import ChannelSecurity, TlsConfig

    if not (args.tls_dir or args.operator or args.site):
        return None
    directory = args.tls_dir or os.environ.get("DRCTL_TLS_DIR")
    if not directory:
        raise UsageError("--operator/--site name a certificate of the deployment's TLS "
                         "directory: give --tls-dir DIR (or set $DRCTL_TLS_DIR)")
    who = identity(args)
    if who is None:
        raise UsageError("--tls-dir needs --operator NAME or --site NAME (or "
                         "$DRCTL_TLS_AS): whose certificate the drill uses")
    return ChannelSecurity(TlsConfig.from_dir(directory, Identity(*who)))


def cmd_check(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from failover.steprun import SITE_ADDRESS
    from runbooks.drill import run_health_checks
    from runbooks.model import StepType

    rb = _load(args.file)
    if rb is None:
        return _invalid()
    if not _service(rb, args.service):
        return 2
    env = dict(os.environ)
    if args.site:  # as that site's agent runs them: {site_address} is its address
        site = rb.sites.get(args.site)
        if site is None:
            print(f"drctl: error [usage]: --site {args.site}: not a site of {rb.path} (sites: "
                  f"{', '.join(sorted(rb.sites))})", file=sys.stderr)
            return 2
        env.update(DRCTL_SITE=site.name, DRCTL_SITE_ADDRESS=site.address)
    needs = [s.name for s in rb.services[args.service].steps if s.type is StepType.HEALTH_CHECK
             and (SITE_ADDRESS in f"{s.http}{s.tcp}" or "DRCTL_SITE_ADDRESS" in f"{s.command}")]
    if needs and not env.get("DRCTL_SITE_ADDRESS"):
        print(f"drctl: error [usage]: the check {needs[0]!r} names the address of the site "
              "that runs it: give --site NAME (or set $DRCTL_SITE_ADDRESS)", file=sys.stderr)
        return 2

    def retrying(check: str, what: str) -> None:  # a long retry schedule is not silent
        print(f"  {check}: {what}", file=sys.stderr, flush=True)

    results = asyncio.run(run_health_checks(rb.services[args.service], env, retrying))
    if not results:
        print(f"{args.service}: the runbook gives it no health checks (nothing to run)")
    for r in results:
        print(f"{'ok ' if r.ok else 'FAIL'} {r.seconds:7.3f}s  {r.name}: {r.detail}")
    return 0 if all(r.ok for r in results) else 1

