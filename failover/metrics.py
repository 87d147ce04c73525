"""The controller's metrics, named drctl_failover_<name>_<unit>, on an explicit registry."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from failover.fsm import PROTECTED_STATES, State

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry, sites: list[str]) -> None:
        from prometheus_client import Counter, Gauge

        self.site_up = Gauge("drctl_failover_site_up", "1 while the site's heartbeat is in "
                             "etcd.", ["site"], registry=registry)
        self.heartbeat_age = Gauge("drctl_failover_heartbeat_age_seconds", "Seconds since the "
                                   "site's last heartbeat.", ["site"], registry=registry)
        self.state = Gauge("drctl_failover_service_state", "1 for the state the service is in.",
                           ["service", "state"], registry=registry)
        self.protected = Gauge("drctl_failover_service_protected", "1 while the service has a "
                               "replica receiving its writes (healthy or draining), 0 otherwise "
                               "(unprotected, failing over, failed over, resyncing, failed...).",
                               ["service"], registry=registry)
        self.epoch = Gauge("drctl_failover_epoch", "The service's fencing epoch.", ["service"],
                           registry=registry)
        self.lag = Gauge("drctl_failover_replica_lag_seconds", "Replication lag last reported "
                         "by the service's primary.", ["service"], registry=registry)
        self.transitions = Counter("drctl_failover_transitions", "State changes, by target "
                                   "state.", ["service", "to"], registry=registry)
        self.leader = Gauge("drctl_failover_is_leader", "1 while this controller leads.",
                            registry=registry)
        self._last_seen: dict[str, float] = {s: time.time() for s in sites}
        for s in sites:
            self.site_up.labels(s).set(0)

    def heartbeat(self, site: str, at: float | None) -> None:
        now = time.time()
        if at is not None:
            self._last_seen[site] = at
        self.site_up.labels(site).set(1 if at is not None else 0)
        self.heartbeat_age.labels(site).set(max(0.0, now - self._last_seen.get(site, now)))

    def known_services(self, services: list[str]) -> None:
        for name in services:
            for st in State:
                self.transitions.labels(name, st.value)

    def service(self, name: str, state: State, epoch: int, lag: float | None) -> None:
        for s in State:
            self.state.labels(name, s.value).set(1 if s is state else 0)
        self.protected.labels(name).set(1 if state in PROTECTED_STATES else 0)
        self.epoch.labels(name).set(epoch)
        if lag is not None:
            self.lag.labels(name).set(lag)
