"""`drctl agent`: a site agent. With a runbook whose site has a ``data_dir`` it runs the
data path of the site's services (sites/agent.py); otherwise it follows the records with
hooks only (failover/agent.py)."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from drctl.argtypes import hostport

if TYPE_CHECKING:
    from failover.coordination.base import CoordinationStore
    from sites.agent import ManagedSiteAgent


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = sub.add_parser("agent", help="run a site agent (heartbeat, data path by role, hooks, "
                                     "self-fencing)")
    a.add_argument("--config", required=True, help="the runbook (or a cluster.yaml)")
    a.add_argument("--site", required=True)
    a.add_argument("--lag-url", help="metrics URL of a source agent this agent does not run "
                                     "itself (hook-driven sites)")
    a.add_argument("--metrics-listen", type=hostport, metavar="HOST:PORT",
                   help="serve the site's metrics here: those of the data path it runs (its "
                   "capture agents' and target daemon's), labelled site=SITE (sites/metrics.py)")
    a.add_argument("--metrics-tls", action="store_true",
                   help="serve them over HTTPS with the site's certificate; scrapers need a "
                   "client certificate from the deployment's CA")
    tls = a.add_mutually_exclusive_group()
    tls.add_argument("--tls-dir", metavar="DIR",
                     help="the site's TLS directory (`drctl certs`: ca.crt, epoch.pub, "
                     "sites/SITE.crt and .key), given to the data path it runs (default: "
                     "$DRCTL_TLS_DIR; docs/security.md)")
    tls.add_argument("--insecure", action="store_true",
                     help="run the data path over plaintext replication (loopback tests only)")
    a.set_defaults(func=cmd_agent)


def cmd_agent(args: argparse.Namespace) -> int:
    from failover.agent import SiteAgent
    from failover.cli import _daemon, _load
    from failover.config import ConfigError

    cfg, runbook = _load(args.config)
    if args.site not in cfg.sites:
        raise ConfigError(f"--site {args.site}: not in {cfg.path} (sites: "
                          f"{', '.join(sorted(cfg.sites))})")
    if runbook is not None and runbook.sites[args.site].data_dir:
        from sites.agent import ManagedSiteAgent

        if args.lag_url:
            raise ConfigError("--lag-url: this site's agent runs its own capture agents and "
                              "reads their lag itself")
        tls_dir = None if args.insecure else args.tls_dir or os.environ.get("DRCTL_TLS_DIR")
        if tls_dir is None and not args.insecure:
            raise ConfigError("the data path replicates over mutual TLS: give --tls-dir DIR "
                              f"(with sites/{args.site}.crt and .key; `drctl certs`) or "
                              "--insecure (loopback tests only)")
        rb = runbook
        if args.metrics_tls and (not args.metrics_listen or tls_dir is None):
            raise ConfigError("--metrics-tls needs --metrics-listen and the site's certificate "
                              "(--tls-dir)")
        children = _site_metrics(args.metrics_listen, args.site,
                                 tls_dir if args.metrics_tls else None)

        def make(store: CoordinationStore) -> ManagedSiteAgent:
            agent = ManagedSiteAgent(cfg, args.site, store, rb, tls_dir)
            children.append(agent.plane.metrics_urls)
            return agent

        asyncio.run(_daemon(cfg, make))
    else:
        if args.metrics_listen:
            raise ConfigError("--metrics-listen: this site runs no data path (no data_dir in "
                              "a runbook): its source agent serves the metrics")
        asyncio.run(_daemon(cfg, lambda store: SiteAgent(cfg, args.site, store, args.lag_url)))
    return 0


def _site_metrics(listen: str | None, site: str,
                  tls_dir: str | None = None) -> list[Callable[[], list[str]]]:
    """With --metrics-listen, serve the site's metrics (sites/metrics.py) from the children
    of the data plane appended to the returned list once the agent has made it."""
    planes: list[Callable[[], list[str]]] = []
    if listen:
        from prometheus_client import CollectorRegistry

        from sites.metrics import ChildrenCollector, serve

        registry = CollectorRegistry()
        registry.register(ChildrenCollector(site, lambda: planes[0]() if planes else []))
        serve(registry, listen, tls_dir, site)
    return planes
