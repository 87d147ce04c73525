"""What the controller reads from the sites' heartbeats into a service's record, and what the
view of its state machine takes from them (controller.py, each tick)."""

from __future__ import annotations

from failover.records import Heartbeat, ServiceRecord


def observe_heartbeats(rec: ServiceRecord, service: str, primary_hb: Heartbeat | None,
             replica_hb: Heartbeat | None) -> tuple[bool | None, bool, bool]:
    """Copy what the heartbeats say into the record; return the primary's (protected,
    barrier, runs no data path) for the view. Reports at an older epoch than the record's say
    nothing."""
    protected, barrier, no_data_path = None, False, False
    health = primary_hb.services.get(service) if primary_hb is not None else None
    if health is not None and health.role == "primary":
        no_data_path = not health.data_path
        rec.last_lag_seconds = health.lag_seconds
        rec.resync = health.resync
        if health.epoch >= rec.epoch:
            protected, barrier = health.protected, health.barrier
        if protected is True or (protected is None and not health.data_path):
            # (an agent that runs no data path, hooks only, cannot say: its replication is
            # the runbook's hooks' business)
            rec.replica_consistent = True
        elif health.resync is not None:
            rec.replica_consistent = False
    elif primary_hb is not None:
        rec.resync = None  # alive but not (yet) serving this service: no resync of its own
    back = replica_hb.services.get(service) if replica_hb is not None else None
    if back is not None:
        rec.unreplicated_blocks = back.unreplicated_blocks
        rec.unreplicated_file = back.unreplicated_file
    if protected is True and health is not None and health.data_path and (
            back is None or back.role != "replica"
            or not back.data_path.startswith("running")):
        # The primary's capture agent holds a verified point, but the replica site is gone
        # or its target daemon is not running: nothing receives the next writes.
        protected = False
    return protected, barrier, no_data_path
