"""`drctl replicate ...`: the parser of serve (target daemon), push (source agent), push-group,
fence, verify; the commands themselves are in replicator/cli_commands.py.

The replication channel is mutual TLS (docs/security.md): ``--tls-dir DIR --site NAME`` (the
deployment directory of `drctl certs`, this process's site) or ``--ca/--cert/--key``;
``--insecure`` (plaintext, unauthenticated) is refused for a non-loopback address
(replicator/cli_security.py)."""

from __future__ import annotations

import argparse

from drctl.argtypes import (
    count,
    hostport,
    natural,
    seconds,
    seconds_or_zero,
    zstd_level,
)
from drctl.argtypes import port as _port
from replicator.cli_commands import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RETRY_TIMEOUT,
    cmd_fence,
    cmd_push,
    cmd_push_group,
    cmd_serve,
    cmd_verify,
)
from replicator.errors import UsageError
from replicator.units import (
    parse_rate,
    parse_rate_limit,
    parse_size,
    parse_verify_rate,
)


def _rate(text: str) -> int:
    try:
        return parse_rate(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate_limit(text: str) -> int:
    try:
        return parse_rate_limit(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _verify_rate(text: str) -> int:
    try:
        return parse_verify_rate(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _nbd_address(text: str) -> str:
    if text.startswith("unix:"):
        if len(text) == len("unix:"):
            raise argparse.ArgumentTypeError("expected unix:PATH")
        return text
    return hostport(text)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rep = sub.add_parser("replicate", help="block replication: serve, push, push-group, "
                         "fence, verify")
    rsub = rep.add_subparsers(dest="replicate_cmd", required=True, metavar="COMMAND")
    for add in (_add_serve, _add_push, _add_push_group, _add_fence, _add_verify):
        add(rsub)


def _add_serve(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:

    s = rsub.add_parser("serve", help="run a target daemon that keeps replicas under --dir")
    s.add_argument("--listen", required=True, type=hostport, metavar="HOST:PORT")
    s.add_argument("--dir", required=True, help="directory holding the replicas")
    _add_metrics_args(s)
    s.add_argument("--grace", type=seconds_or_zero, default=10.0,
                   help="drain time on SIGTERM (s)")
    s.add_argument("--mode", choices=("hot", "warm"), default="hot",
                   help="hot: write each consistency point into the replica as it completes; "
                   "warm: keep them in the redo journal until promotion or --apply-interval")
    s.add_argument("--apply-interval", type=seconds, metavar="SECONDS",
                   help="warm mode: apply complete consistency points on this schedule")
    s.add_argument("--max-volumes", type=count, default=64, metavar="N",
                   help="create at most this many replicas under --dir (default 64)")
    s.add_argument("--max-volume-size", type=_size, default=1 << 40, metavar="SIZE",
                   help="refuse replicas larger than this (default 1TiB; the hash index "
                   "takes 8 bytes of memory per block)")
    s.add_argument("--max-clones", type=count, default=4, metavar="N",
                   help="drill clones held at once per volume (default 4)")
    s.add_argument("--allow-shrink", action="store_true",
                   help="let a handshake shrink a replica that holds data past the new end "
                   "(refused by default)")
    _add_tls_args(s, serve=True)
    s.set_defaults(func=cmd_serve)


def _add_push(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = rsub.add_parser("push", help="replicate a volume (file or block device) to a target")
    p.add_argument("path", help="the protected volume: an image file or a block device")
    p.add_argument("--to", required=True, type=hostport, metavar="HOST:PORT")
    p.add_argument("--volume", required=True, help="volume name on the target")
    p.add_argument("--rate-limit", type=_rate_limit, metavar="RATE",
                   help="bandwidth cap, e.g. 20MB/s (a bare number is bytes/s; below 64KiB/s "
                   "is refused as a unit mistake)")
    p.add_argument("--once", action="store_true",
                   help="sync until the replica equals the volume, verify, exit")
    p.add_argument("--state-dir", help="where the agent keeps its resume state "
                   "(default: $DRCTL_STATE_DIR or ~/.local/state/drctl)")
    p.add_argument("--no-dedup", action="store_true", help="do not send COPY records")
    p.add_argument("--connect-timeout", type=seconds, metavar="SECONDS",
                   help="with --once: give up (exit 69) when the target cannot be reached "
                   f"this long (default {DEFAULT_CONNECT_TIMEOUT:g}, as verify), and when it "
                   "stops answering mid-sync this long (default "
                   f"{DEFAULT_RETRY_TIMEOUT:g}); without --once the agent waits for it, "
                   "logging that it does")
    p.add_argument("--verify-from-disk", action="store_true",
                   help="with --once: also re-read the replica and compare every block")
    p.add_argument("--nbd-listen", type=_nbd_address, metavar="HOST:PORT|unix:PATH",
                   help="serve the volume over NBD and ship every captured write "
                   "(no rescans); not with --once; loopback or a unix socket unless "
                   "--nbd-tls or --insecure-nbd")
    _add_shared_push_args(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON report on exit")
    p.set_defaults(func=cmd_push)


def _add_push_group(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = rsub.add_parser("push-group", help="capture several volumes as one consistency "
                        "group (one write order) over NBD and replicate them")
    g.add_argument("members", nargs="+", metavar="VOLUME=PATH",
                   help="member volumes: name on the target = image file or block device")
    g.add_argument("--group", required=True, help="consistency group name")
    g.add_argument("--to", required=True, type=hostport, metavar="HOST:PORT")
    g.add_argument("--nbd-listen", required=True, type=_nbd_address,
                   metavar="HOST:PORT|unix:PATH",
                   help="one NBD server; each member is an export named after its volume "
                   "(loopback or a unix socket unless --nbd-tls or --insecure-nbd)")
    g.add_argument("--state-dir", help="where the agent keeps its journal and resume state")
    g.add_argument("--rate-limit", type=_rate_limit, metavar="RATE",
                   help="cap for the whole group (as push --rate-limit)")
    _add_shared_push_args(g)
    g.set_defaults(func=cmd_push_group)


def _add_shared_push_args(p: argparse.ArgumentParser) -> None:
    """The flags of `push` that `push-group` takes too."""
    p.add_argument("--block-size", type=_size, default=4096)
    p.add_argument("--epoch", type=natural, default=0, help="fencing epoch of this source")
    p.add_argument("--compress-level", type=zstd_level, default=1,
                   help="zstd level 0..22, 0 disables")
    p.add_argument("--interval", type=seconds, default=1.0, help="change poll interval (s)")
    p.add_argument("--window", type=_size, default=64 << 20, help="max unacknowledged bytes")
    p.add_argument("--journal-limit", type=_size, default=1 << 30, metavar="SIZE",
                   help="with write capture: past this size the change journal falls back to "
                   "a change bitmap until the link catches up (default 1GiB)")
    p.add_argument("--cp-interval", type=seconds_or_zero, default=0.0, metavar="SECONDS",
                   help="with write capture: close a consistency point when writes have "
                   "waited this long without a client FLUSH (default 0: as soon as the "
                   "points before it are sent)")
    p.add_argument("--verify-rate", type=_verify_rate, default=2 << 20,  # DEFAULT_VERIFY_RATE
                   metavar="RATE",
                   help="with write capture: compare the replica's disk with the volume in "
                   "the background at this rate and repair what differs (default 2MiB/s; 0: "
                   "off)")
    p.add_argument("--epoch-token", metavar="FILE",
                   help="the controller's signed token for --epoch (read at every "
                   "handshake): a target raises a replica's epoch only on a valid one")
    nbd = p.add_mutually_exclusive_group()
    nbd.add_argument("--nbd-tls", action="store_true",
                     help="NBD clients must use TLS (NBD_OPT_STARTTLS) with a certificate of "
                     "the deployment: this --site's, or an operator's named by --nbd-allow; "
                     "the export presents the --site certificate; --nbd-listen may then be "
                     "any address")
    p.add_argument("--nbd-allow", action="append", default=[], metavar="operator:NAME",
                   help="with --nbd-tls: this operator's certificate may attach too "
                   "(repeatable; operator:* for any operator of the deployment)")
    nbd.add_argument("--insecure-nbd", action="store_true",
                     help="let --nbd-listen be a non-loopback address without TLS (plain NBD "
                     "has no authentication or encryption)")
    _add_metrics_args(p)
    p.add_argument("--rpo-budget", type=seconds_or_zero, default=0.0, metavar="SECONDS",
                   help="exported as drctl_replication_rpo_budget_seconds for alerting")
    _add_tls_args(p, serve=False)


def _add_fence(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    f = rsub.add_parser("fence", help="raise a replica's epoch: older sources are refused")
    f.add_argument("--to", required=True, type=hostport, metavar="HOST:PORT")
    f.add_argument("--volume", required=True)
    f.add_argument("--epoch", required=True, type=natural)
    f.add_argument("--epoch-token", metavar="FILE",
                   help="the controller's signed token (needed to raise the epoch)")
    f.add_argument("--release", action="store_true",
                   help="promote: the target stops serving the replica (its site's volume)")
    _add_connect_timeout(f)
    _add_tls_args(f, serve=False)
    f.set_defaults(func=cmd_fence)


def _add_verify(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    v = rsub.add_parser("verify", help="exit 0 only if the replica equals the volume")
    v.add_argument("path")
    v.add_argument("--to", required=True, type=hostport, metavar="HOST:PORT")
    v.add_argument("--volume", required=True)
    v.add_argument("--block-size", type=_size, default=4096)
    v.add_argument("--json", action="store_true")
    _add_connect_timeout(v)
    _add_tls_args(v, serve=False)
    v.set_defaults(func=cmd_verify)


def _add_connect_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect-timeout", type=seconds, default=DEFAULT_CONNECT_TIMEOUT,
                   metavar="SECONDS", help="give up when the target cannot be reached this "
                   f"long (default {DEFAULT_CONNECT_TIMEOUT:g})")


def _add_tls_args(p: argparse.ArgumentParser, serve: bool) -> None:
    g = p.add_argument_group("channel security (docs/security.md)")
    g.add_argument("--tls-dir", metavar="DIR",
                   help="the deployment directory (`drctl certs`): ca.crt, epoch.pub and this "
                   "process's certificate (default: $DRCTL_TLS_DIR)")
    who = g.add_mutually_exclusive_group()
    who.add_argument("--site", metavar="NAME",
                     help="this process's site: DIR/sites/NAME.crt and .key")
    if not serve:
        who.add_argument("--operator", metavar="NAME",
                         help="act as an operator: DIR/operators/NAME.crt and .key")
    g.add_argument("--ca", metavar="FILE", help="instead of --tls-dir: the CA certificate")
    g.add_argument("--cert", metavar="FILE", help="... this process's certificate")
    g.add_argument("--key", metavar="FILE", help="... and its key (mode 0600)")
    if serve:
        g.add_argument("--epoch-pub", metavar="FILE",
                       help="the controllers' epoch-token verification key(s) "
                       "(default: DIR/epoch.pub)")
        g.add_argument("--allow", action="append", default=[],
                       metavar="SITE[=VOLUME,...]|operator:NAME",
                       help="who may use this target (repeatable): a site may push, fence, "
                       "clone and read the volumes named (all without =); operator:NAME "
                       "(or operator:*) may clone and read; the own --site may fence")
    else:
        g.add_argument("--target-site", metavar="NAME",
                       help="the site the target's certificate must name (default: the "
                       "host name in --to)")
    g.add_argument("--insecure", action="store_true",
                   help="plaintext and unauthenticated: loopback tests only")


def _add_metrics_args(p: argparse.ArgumentParser) -> None:
    m = p.add_mutually_exclusive_group()
    m.add_argument("--metrics-port", type=_port, metavar="PORT",
                   help="serve metrics on 127.0.0.1:PORT")
    m.add_argument("--metrics-listen", type=hostport, metavar="HOST:PORT",
                   help="serve metrics on this address")
    p.add_argument("--metrics-tls", action="store_true",
                   help="metrics over HTTPS with this process's certificate; scrapers need a "
                   "client certificate from the deployment's CA")
