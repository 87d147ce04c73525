"""Structured, JSON-serialisable reports of replication work (for the API and the CLI)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum


class PushState(StrEnum):
    CONNECTING = "connecting"
    SYNCING = "syncing"
    IDLE = "idle"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class PushReport:
    volume: str
    target: str
    state: PushState
    volume_bytes: int
    scanned_bytes: int
    changed_blocks: int
    data_blocks: int
    zero_blocks: int
    dedup_blocks: int
    raw_bytes: int
    payload_bytes: int
    wire_bytes: int
    batches: int
    resent_batches: int
    reconnects: int
    acked_seq: int
    full_listing_fetched: bool
    verified: bool
    seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)
