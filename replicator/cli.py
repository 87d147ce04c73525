"""`drctl replicate ...`: serve (target daemon), push (source agent), verify."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict

from replicator.driver import PushOptions
from replicator.errors import UsageError
from replicator.source_state import default_state_root, group_journal_path, state_dir_for
from replicator.units import parse_hostport, parse_rate, parse_size


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}")
    return int(text)


def _rate(text: str) -> int:
    try:
        return parse_rate(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _address(text: str) -> str:
    try:
        parse_hostport(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rep = sub.add_parser("replicate", help="block replication: serve, push, verify")
    rsub = rep.add_subparsers(dest="replicate_cmd", required=True, metavar="COMMAND")
    for add in (_add_serve, _add_push, _add_push_group, _add_fence, _add_verify):
        add(rsub)


def _add_serve(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:

    s = rsub.add_parser("serve", help="run a target daemon that keeps replicas under --dir")
    s.add_argument("--listen", required=True, type=_address, metavar="HOST:PORT")
    s.add_argument("--dir", required=True, help="directory holding the replicas")
    s.add_argument("--metrics-port", type=_port)
    s.add_argument("--grace", type=float, default=10.0, help="drain time on SIGTERM (s)")
    s.add_argument("--mode", choices=("hot", "warm"), default="hot",
                   help="hot: write each consistency point into the replica as it completes; "
                   "warm: keep them in the redo journal until promotion or --apply-interval")
    s.add_argument("--apply-interval", type=float, metavar="SECONDS",
                   help="warm mode: apply complete consistency points on this schedule")
    s.set_defaults(func=cmd_serve)


def _add_push(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = rsub.add_parser("push", help="replicate a volume (file or block device) to a target")
    p.add_argument("path", help="the protected volume: an image file or a block device")
    p.add_argument("--to", required=True, type=_address, metavar="HOST:PORT")
    p.add_argument("--volume", required=True, help="volume name on the target")
    p.add_argument("--rate-limit", type=_rate, metavar="RATE", help="bandwidth cap, e.g. 20MB/s")
    p.add_argument("--once", action="store_true",
                   help="sync until the replica equals the volume, verify, exit")
    p.add_argument("--state-dir", help="where the agent keeps its resume state "
                   "(default: $DRCTL_STATE_DIR or ~/.local/state/drctl)")
    p.add_argument("--no-dedup", action="store_true", help="do not send COPY records")
    p.add_argument("--connect-timeout", type=float, default=120.0,
                   help="give up (with --once) when the target stays unreachable this long")
    p.add_argument("--verify-from-disk", action="store_true",
                   help="with --once: also re-read the replica and compare every block")
    p.add_argument("--nbd-listen", type=_address, metavar="HOST:PORT",
                   help="serve the volume over NBD and ship every captured write "
                   "(no rescans); not with --once")
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
    g.add_argument("--to", required=True, type=_address, metavar="HOST:PORT")
    g.add_argument("--nbd-listen", required=True, type=_address, metavar="HOST:PORT",
                   help="one NBD server; each member is an export named after its volume")
    g.add_argument("--state-dir", help="where the agent keeps its journal and resume state")
    g.add_argument("--rate-limit", type=_rate, metavar="RATE", help="cap for the whole group")
    _add_shared_push_args(g)
    g.set_defaults(func=cmd_push_group)


def _add_shared_push_args(p: argparse.ArgumentParser) -> None:
    """The flags of `push` that `push-group` takes too."""
    p.add_argument("--block-size", type=_size, default=4096)
    p.add_argument("--epoch", type=int, default=0, help="fencing epoch of this source")
    p.add_argument("--compress-level", type=int, default=1, help="zstd level, 0 disables")
    p.add_argument("--interval", type=float, default=1.0, help="change poll interval (s)")
    p.add_argument("--window", type=_size, default=64 << 20, help="max unacknowledged bytes")
    p.add_argument("--journal-limit", type=_size, default=1 << 30, metavar="SIZE",
                   help="with write capture: past this size the change journal falls back to "
                   "a change bitmap until the link catches up (default 1GiB)")
    p.add_argument("--cp-interval", type=float, default=0.05, metavar="SECONDS",
                   help="with write capture: close a consistency point when writes have "
                   "waited this long without a client FLUSH (default 0.05)")
    p.add_argument("--metrics-port", type=_port)
    p.add_argument("--rpo-budget", type=float, default=0.0, metavar="SECONDS",
                   help="exported as drctl_replication_rpo_budget_seconds for alerting")


def _add_fence(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    f = rsub.add_parser("fence", help="raise a replica's epoch: older sources are refused")
    f.add_argument("--to", required=True, type=_address, metavar="HOST:PORT")
    f.add_argument("--volume", required=True)
    f.add_argument("--epoch", required=True, type=int)
    f.set_defaults(func=cmd_fence)


def _add_verify(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    v = rsub.add_parser("verify", help="exit 0 only if the replica equals the volume")
    v.add_argument("path")
    v.add_argument("--to", required=True, type=_address, metavar="HOST:PORT")
    v.add_argument("--volume", required=True)
    v.add_argument("--block-size", type=_size, default=4096)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

def cmd_serve(args: argparse.Namespace) -> int:
    from replicator.daemon import serve

    if args.apply_interval is not None and (args.mode != "warm" or args.apply_interval <= 0):
        raise UsageError("--apply-interval needs --mode warm and a positive number of seconds")
    asyncio.run(serve(args.listen, args.dir, args.metrics_port, args.grace, args.mode,
                      args.apply_interval))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from replicator.agent import run_push

    _check_push_flags(args)
    if not os.path.exists(args.path):
        raise UsageError(f"volume {args.path} does not exist")
    _check_name(args.volume)
    root = args.state_dir or default_state_root()
    opts = PushOptions(
        path=args.path, address=args.to, volume=args.volume,
        state_dir=state_dir_for(root, args.path, args.to, args.volume),
        rate_limit=args.rate_limit, once=args.once, block_size=args.block_size,
        epoch=args.epoch, compress_level=args.compress_level, dedup=not args.no_dedup,
        interval=args.interval, window_bytes=args.window,
        connect_timeout=args.connect_timeout if args.once else None,
        verify_from_disk=args.verify_from_disk, rpo_budget=args.rpo_budget,
        nbd_listen=args.nbd_listen, journal_limit=args.journal_limit,
        cp_interval=args.cp_interval,
    )
    if args.once and args.nbd_listen:
        raise UsageError("--nbd-listen serves the volume: it needs a running agent, not --once")
    report = asyncio.run(run_push(opts, args.metrics_port, show_progress=not args.no_progress))
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
    if args.cp_interval <= 0:
        raise UsageError("--cp-interval must be positive")


def _parse_members(items: list[str]) -> list[tuple[str, str]]:
    members: list[tuple[str, str]] = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"member {item!r}: expected VOLUME=PATH")
        _check_name(name)
        if not os.path.exists(path):
            raise UsageError(f"member {name}: volume {path} does not exist")
        members.append((name, path))
    names = [n for n, _ in members]
    paths = [os.path.realpath(p) for _, p in members]
    if len(set(names)) != len(names) or len(set(paths)) != len(paths):
        raise UsageError("each member needs its own volume name and its own path")
    return members


def cmd_push_group(args: argparse.Namespace) -> int:
    from replicator.agent import run_group

    _check_name(args.group)
    members = _parse_members(args.members)
    _check_push_flags(args)
    root = args.state_dir or default_state_root()
    names = tuple(n for n, _ in members)
    opts = [PushOptions(
        path=path, address=args.to, volume=name,
        state_dir=state_dir_for(root, path, args.to, name), rate_limit=args.rate_limit,
        block_size=args.block_size, epoch=args.epoch, compress_level=args.compress_level,
        dedup=False, interval=args.interval, window_bytes=args.window, connect_timeout=None,
        rpo_budget=args.rpo_budget, nbd_listen=args.nbd_listen,
        journal_limit=args.journal_limit, cp_interval=args.cp_interval, group=args.group,
        group_members=names) for name, path in members]
    journal = group_journal_path(root, args.group, args.to, members)
    asyncio.run(run_group(opts, journal, args.metrics_port))
    return 0


def _check_name(name: str) -> None:
    from replicator.errors import ProtocolError
    from replicator.replica import check_volume_name

    try:
        check_volume_name(name)
    except ProtocolError as exc:
        raise UsageError(f"--volume: {exc}") from None


def cmd_verify(args: argparse.Namespace) -> int:
    from replicator.verify import verify_replica

    _check_name(args.volume)
    result = asyncio.run(verify_replica(args.path, args.to, args.volume, args.block_size))
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"volume {args.volume}: replica equals source ({result.blocks} blocks)")
    return 0


def cmd_fence(args: argparse.Namespace) -> int:
    from replicator.transport.client import FenceInfo, TargetClient

    _check_name(args.volume)
    if args.epoch < 0:
        raise UsageError("--epoch must be >= 0")

    async def fence() -> FenceInfo:
        client = TargetClient(args.to)
        try:
            return await client.fence(args.volume, args.epoch)
        finally:
            await client.close()

    info = asyncio.run(fence())
    point = f", consistency point {info.applied_cp}" if info.applied_cp else ""
    dropped = (f"; dropped {info.discarded_batches} batches of an incomplete consistency point"
               if info.discarded_batches else "")
    print(f"volume {args.volume}: replica at epoch {info.epoch}{point}; sources below it are "
          f"refused{dropped}")
    return 0
