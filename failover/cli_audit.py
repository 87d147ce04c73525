"""`drctl audit show|verify`: the hash-chained audit log in etcd and its local mirror."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from failover.cli_common import _config, _store


def cmd_audit_show(args: argparse.Namespace) -> int:
    from failover.audit import describe, read_etcd

    cfg = _config(args.config, secrets=False)  # reads etcd only

    async def read() -> list[Any]:
        store = _store(cfg)
        try:
            return (await read_etcd(store, cfg.prefix)).slots
        finally:
            await store.close()

    slots = asyncio.run(read())
    if args.last is not None:
        slots = slots[-args.last:] if args.last > 0 else []
    for slot in slots:
        if slot.record is None:
            print(f"{slot.seq:>6} (not a record: {slot.where})")
        elif args.json:
            print(json.dumps(slot.record, sort_keys=True))
        else:
            print(describe(slot.record))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 if the chain verifies; AuditChainBroken (exit 1, one line naming the record)
    if not."""
    from failover.audit import compare, read_etcd, read_file, verify
    from failover.config import ConfigError

    if not args.config and not args.file:
        raise ConfigError("drctl audit verify: give --config (the chain in etcd), --file (a "
                          "local mirror), or both")
    said = []
    chain = None
    if args.config:
        cfg = _config(args.config, secrets=False)  # reads etcd only

        async def read() -> Any:
            store = _store(cfg)
            try:
                return await read_etcd(store, cfg.prefix)
            finally:
                await store.close()

        chain = asyncio.run(read())
        count, head = verify(chain, "etcd", with_head=True)
        said.append(f"{count} records in etcd (head {head[:16]})")
    if args.file:
        try:
            mirror = read_file(args.file)
        except OSError as exc:
            raise ConfigError(f"--file {args.file}: {exc.strerror}") from exc
        count, head = verify(mirror, args.file)
        if chain is not None:
            compare(chain, mirror, args.file)
        said.append(f"{count} records in {args.file} (head {head[:16]}"
                    + (", the same as in etcd)" if chain is not None else ")"))
    print(f"audit log verified: {'; '.join(said)}")
    return 0
