"""`drctl replicate ...`: serve (target daemon), push (source agent), verify.

The replication channel is mutual TLS (docs/security.md): ``--tls-dir DIR --site NAME`` (the
deployment directory of `drctl certs`, this process's site) or ``--ca/--cert/--key``;
``--insecure`` (plaintext, unauthenticated) is refused for a non-loopback address."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

from drctl.argtypes import (
    count,
    hostport,
    natural,
    parse_hostport,
    seconds,
    seconds_or_zero,
    zstd_level,
)
from drctl.argtypes import port as _port
from replicator.errors import UsageError
from replicator.source_state import default_state_root, group_journal_path, state_dir_for
from replicator.units import (
    parse_rate,
    parse_rate_limit,
    parse_size,
    parse_verify_rate,
)

if TYPE_CHECKING:
    from replicator.metrics import MetricsEndpoint
    from replicator.transport.security import ChannelSecurity, TlsConfig
    from replicator.transport.slots import Limits


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


# how long a one-shot command (verify, fence, push --once) waits for the target to answer
DEFAULT_CONNECT_TIMEOUT = 10.0
# how long push --once retries a target that stops answering mid-sync (it was reached)
DEFAULT_RETRY_TIMEOUT = 120.0


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

def cmd_serve(args: argparse.Namespace) -> int:
    from replicator.daemon import check_directory, serve
    from replicator.transport.security import AccessPolicy

    if args.apply_interval is not None and (args.mode != "warm" or args.apply_interval <= 0):
        raise UsageError("--apply-interval needs --mode warm and a positive number of seconds")
    limits = _limits(args)
    tls = _tls(args, serve=True)
    policy = None
    if tls is None:
        _insecure(args.listen, "listen address")
    else:
        if tls.identity.kind != "site":
            raise UsageError(f"a target runs as a site: the certificate is for {tls.identity}")
        if tls.epoch_keys is None:
            raise UsageError("a TLS target needs the controllers' epoch key (DIR/epoch.pub or "
                             "--epoch-pub FILE)")
        policy = AccessPolicy.parse(tls.identity.name, args.allow)
        if not policy.writers:
            print("drctl: warning: no --allow SITE: no source may push to this target",
                  file=sys.stderr)
    check_directory(args.dir)  # before anything is made: a bad --dir or address leaves none
    _check_listen("--listen", args.listen)
    metrics = _metrics(args, tls)
    asyncio.run(serve(args.listen, args.dir, metrics, args.grace, args.mode,
                      args.apply_interval, tls, policy, limits))
    return 0


def _limits(args: argparse.Namespace) -> Limits:
    from replicator.transport.slots import Limits

    # the parser has checked that each is positive
    return Limits(args.max_volumes, args.max_volume_size, args.max_clones, args.allow_shrink)


def cmd_push(args: argparse.Namespace) -> int:
    from replicator.agent import run_push
    from replicator.driver import PushOptions

    _check_push_flags(args)
    _check_volume_path(args.path, "volume")
    _check_name(args.volume)
    security = _channel(args)
    root = _state_root(args)
    opts = PushOptions(
        path=args.path, address=args.to, volume=args.volume,
        state_dir=state_dir_for(root, args.path, args.to, args.volume),
        rate_limit=args.rate_limit, once=args.once, block_size=args.block_size,
        epoch=args.epoch, compress_level=args.compress_level, dedup=not args.no_dedup,
        interval=args.interval, window_bytes=args.window,
        connect_timeout=(args.connect_timeout or DEFAULT_CONNECT_TIMEOUT) if args.once
        else None,
        retry_timeout=(args.connect_timeout or DEFAULT_RETRY_TIMEOUT) if args.once else None,
        verify_from_disk=args.verify_from_disk, rpo_budget=args.rpo_budget,
        nbd_listen=args.nbd_listen, journal_limit=args.journal_limit,
        cp_interval=args.cp_interval, security=security, epoch_token=args.epoch_token,
        nbd_tls=_nbd_tls(args, security), nbd_allow=_nbd_allow(args),
        verify_rate=args.verify_rate,
    )
    if args.once and args.nbd_listen:
        raise UsageError("--nbd-listen serves the volume: it needs a running agent, not --once")
    metrics = _metrics(args, security.tls)
    report = asyncio.run(run_push(opts, metrics, show_progress=not args.no_progress))
    if args.json:
        print(report.to_json(), flush=True)
    elif args.once:
        print(f"volume {report.volume}: replica verified at seq {report.acked_seq}; shipped "
              f"{report.data_blocks} data, {report.zero_blocks} zero, {report.dedup_blocks} "
              f"dedup blocks, {report.wire_bytes} bytes on the wire in {report.seconds}s",
              file=sys.stderr)
    return 0


def _check_push_flags(args: argparse.Namespace) -> None:
    """The flags `push` and `push-group` share."""
    if args.block_size % 512 or args.block_size > 1 << 20:
        raise UsageError("--block-size must be a multiple of 512, at most 1MiB")
    if args.epoch < 0:
        raise UsageError("--epoch must be >= 0")
    if args.journal_limit < 64 * args.block_size:
        raise UsageError(f"--journal-limit must be at least {64 * args.block_size} bytes")
    if args.cp_interval < 0:
        raise UsageError("--cp-interval must not be negative")
    if args.nbd_listen:
        _check_nbd(args.nbd_listen, args.insecure_nbd or args.nbd_tls)
    elif args.nbd_tls:
        raise UsageError("--nbd-tls is the NBD export's TLS: it needs --nbd-listen")
    _nbd_allow(args)
    if args.epoch_token and not os.path.isfile(args.epoch_token):
        raise UsageError(f"--epoch-token {args.epoch_token}: no such file")
    if args.nbd_listen and not args.nbd_listen.startswith("unix:"):
        _check_listen("--nbd-listen", args.nbd_listen)


def _parse_members(items: list[str]) -> list[tuple[str, str]]:
    members: list[tuple[str, str]] = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"member {item!r}: expected VOLUME=PATH")
        _check_name(name)
        _check_volume_path(path, f"member {name}: volume")
        members.append((name, path))
    names = [n for n, _ in members]
    paths = [os.path.realpath(p) for _, p in members]
    if len(set(names)) != len(names) or len(set(paths)) != len(paths):
        raise UsageError("each member needs its own volume name and its own path")
    return members


def cmd_push_group(args: argparse.Namespace) -> int:
    from replicator.agent import run_group
    from replicator.driver import PushOptions

    _check_name(args.group)
    members = _parse_members(args.members)
    _check_push_flags(args)
    security = _channel(args)
    nbd_tls = _nbd_tls(args, security)
    nbd_allow = _nbd_allow(args)
    root = _state_root(args)
    names = tuple(n for n, _ in members)
    opts = [PushOptions(
        path=path, address=args.to, volume=name,
        state_dir=state_dir_for(root, path, args.to, name), rate_limit=args.rate_limit,
        block_size=args.block_size, epoch=args.epoch, compress_level=args.compress_level,
        dedup=False, interval=args.interval, window_bytes=args.window, connect_timeout=None,
        retry_timeout=None,
        rpo_budget=args.rpo_budget, nbd_listen=args.nbd_listen,
        journal_limit=args.journal_limit, cp_interval=args.cp_interval, group=args.group,
        group_members=names, security=security, epoch_token=args.epoch_token,
        nbd_tls=nbd_tls, nbd_allow=nbd_allow, verify_rate=args.verify_rate)
        for name, path in members]
    journal = group_journal_path(root, args.group, args.to, members)
    metrics = _metrics(args, security.tls)
    asyncio.run(run_group(opts, journal, metrics))
    return 0


def _check_volume_path(path: str, what: str) -> None:
    """The protected volume: an image file or a block device."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"{what} {path} is a directory, not an image file or a block device")
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise UsageError(f"{what} {path} is not an image file or a block device")


def _state_root(args: argparse.Namespace) -> str:
    """Where the agent keeps its state: a directory it can write, or one it can make."""
    root = args.state_dir or default_state_root()
    flag = "--state-dir" if args.state_dir else "state directory"
    existing = os.path.abspath(root)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {root}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {root}: {existing} is not writable")
    return root


def _check_listen(flag: str, spec: str) -> None:
    """Refuse an address this host cannot listen on now, before anything is made."""
    from drctl.listening import bind_problem

    host, port = parse_hostport(spec)
    problem = bind_problem(host, port)
    if problem:
        raise UsageError(f"{flag} {spec}: cannot listen there: {problem}")


def _check_name(name: str) -> None:
    from replicator.errors import ProtocolError
    from replicator.replica import check_volume_name

    try:
        check_volume_name(name)
    except ProtocolError as exc:
        raise UsageError(f"--volume: {exc}") from None


def cmd_verify(args: argparse.Namespace) -> int:
    from replicator.verify import verify_replica

    _check_volume_path(args.path, "volume")
    _check_name(args.volume)
    result = asyncio.run(verify_replica(args.path, args.to, args.volume, args.block_size,
                                        _channel(args), args.connect_timeout))
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"volume {args.volume}: replica equals source ({result.blocks} blocks)")
    return 0


def cmd_fence(args: argparse.Namespace) -> int:
    from replicator.transport.client import FenceInfo, TargetClient, token_file

    _check_name(args.volume)
    security = _channel(args)
    token = token_file(args.epoch_token) if args.epoch_token else None

    async def fence() -> FenceInfo:
        client = TargetClient(args.to, security, token)
        try:
            await client.connect(args.connect_timeout)
            return await client.fence(args.volume, args.epoch, release=args.release)
        finally:
            await client.close()

    info = asyncio.run(fence())
    point = f", consistency point {info.applied_cp}" if info.applied_cp else ""
    dropped = (f"; dropped {info.discarded_batches} batches of an incomplete consistency point"
               if info.discarded_batches else "")
    print(f"volume {args.volume}: replica at epoch {info.epoch}{point}; sources below it are "
          f"refused{dropped}")
    return 0


# -- security and endpoints (docs/security.md) ---------------------------------------------


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


def _identity(args: argparse.Namespace) -> tuple[str, str] | None:
    if args.site:
        return "site", args.site
    if getattr(args, "operator", None):
        return "operator", args.operator
    who = os.environ.get("DRCTL_TLS_AS", "")
    kind, _, name = who.partition("/")
    return (kind, name) if kind and name else None


def _tls(args: argparse.Namespace, serve: bool) -> TlsConfig | None:
    """The TLS material the flags name, None with --insecure (after a warning)."""
    from drctl.pki import Identity
    from replicator.transport.security import TlsConfig

    explicit = [f for f in (args.ca, args.cert, args.key) if f]
    if args.insecure:
        if args.tls_dir or explicit:
            raise UsageError("--insecure cannot be combined with --tls-dir/--ca/--cert/--key")
        print("drctl: warning: --insecure: the replication channel is plaintext and "
              "unauthenticated (loopback tests only)", file=sys.stderr)
        return None
    epoch_pub = getattr(args, "epoch_pub", None)
    if explicit:
        if len(explicit) != 3 or args.tls_dir:
            raise UsageError("--ca, --cert and --key go together (instead of --tls-dir)")
        if serve and not epoch_pub:
            raise UsageError("--ca/--cert/--key: a target also needs --epoch-pub FILE")
        return TlsConfig.from_files(args.ca, args.cert, args.key, epoch_pub)
    directory = args.tls_dir or os.environ.get("DRCTL_TLS_DIR")
    if not directory:
        raise UsageError("the replication channel is mutual TLS: give --tls-dir DIR --site "
                         "NAME (or --ca/--cert/--key); --insecure is for loopback tests only")
    if not os.path.isdir(directory):
        raise UsageError(f"{'--tls-dir' if args.tls_dir else '$DRCTL_TLS_DIR'} {directory}: "
                         "no such directory (`drctl certs init --dir DIR` makes one)")
    who = _identity(args)
    if who is None:
        raise UsageError("--tls-dir needs --site NAME" + ("" if serve else " or --operator "
                                                                           "NAME"))
    tls = TlsConfig.from_dir(directory, Identity(*who), need_epoch_keys=serve and not epoch_pub)
    if epoch_pub:
        from dataclasses import replace

        from drctl.epochtoken import Verifier

        tls = replace(tls, epoch_keys=Verifier.load(epoch_pub))
    return tls


def _channel(args: argparse.Namespace) -> ChannelSecurity:
    from replicator.transport.security import ChannelSecurity

    tls = _tls(args, serve=False)
    if tls is None:
        _insecure(args.to, "target")
    return ChannelSecurity(tls, args.target_site)


def _insecure(address: str, what: str) -> None:
    from replicator.transport.security import require_loopback

    require_loopback(address, what)


def _check_nbd(spec: str, allowed: bool) -> None:
    """A non-loopback export needs TLS (--nbd-tls) or --insecure-nbd (``allowed``)."""
    from replicator.transport.security import is_loopback

    if spec.startswith("unix:") or allowed:
        return
    host = parse_hostport(spec)[0]
    if not is_loopback(host):
        raise UsageError(f"--nbd-listen {spec}: not a loopback address, and NBD without TLS "
                         "has no authentication or encryption: add --nbd-tls (clients then "
                         "need a certificate of the deployment), or --insecure-nbd to serve "
                         "it in the clear anyway")


def _nbd_tls(args: argparse.Namespace, security: ChannelSecurity) -> TlsConfig | None:
    """--nbd-tls: the export serves the process's own site certificate."""
    if not args.nbd_tls:
        return None
    tls = security.tls
    if tls is None:
        raise UsageError("--nbd-tls needs this process's certificate (--tls-dir DIR --site "
                         "NAME), not --insecure")
    if tls.identity.kind != "site":
        raise UsageError(f"--nbd-tls serves the export with a site's certificate: the "
                         f"certificate is for {tls.identity} (give --site NAME)")
    return tls


def _nbd_allow(args: argparse.Namespace) -> frozenset[str]:
    """--nbd-allow operator:NAME: who may attach to the TLS export besides its own site."""
    from replicator.capture.nbdtls import parse_allow

    if args.nbd_allow and not args.nbd_tls:
        raise UsageError("--nbd-allow names who may attach to the export over TLS: it needs "
                         "--nbd-tls")
    return parse_allow(args.nbd_allow)


def _metrics(args: argparse.Namespace, tls: TlsConfig | None) -> MetricsEndpoint | None:
    from replicator.metrics import MetricsEndpoint

    if args.metrics_listen:
        host, port = parse_hostport(args.metrics_listen)
        _check_listen("--metrics-listen", args.metrics_listen)
    elif args.metrics_port:
        host, port = "127.0.0.1", args.metrics_port
        _check_listen("--metrics-port", f"{host}:{port}")
    elif args.metrics_tls:
        raise UsageError("--metrics-tls needs --metrics-listen or --metrics-port")
    else:
        return None
    if not args.metrics_tls:
        return MetricsEndpoint(host, port)
    if tls is None or tls.files is None:
        raise UsageError("--metrics-tls needs this process's certificate (not --insecure)")
    ca, cert, key = tls.files
    return MetricsEndpoint(host, port, cert, key, ca)
