"""The `drctl replicate` commands: serve, push, push-group, verify, fence (their parser is
replicator/cli.py; the security and endpoint flags are read by replicator/cli_security.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

from replicator.cli_security import (
    _channel,
    _check_listen,
    _check_nbd,
    _insecure,
    _metrics,
    _nbd_allow,
    _nbd_tls,
    _tls,
)
from replicator.errors import UsageError
from replicator.source_state import default_state_root, group_journal_path, state_dir_for

if TYPE_CHECKING:
    from replicator.transport.slots import Limits


# how long a one-shot command (verify, fence, push --once) waits for the target to answer
DEFAULT_CONNECT_TIMEOUT = 10.0
# how long push --once retries a target that stops answering mid-sync (it was reached)
DEFAULT_RETRY_TIMEOUT = 120.0


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
        unit = "block" if result.blocks == 1 else "blocks"
        print(f"volume {args.volume}: replica equals source ({result.blocks} {unit})")
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
