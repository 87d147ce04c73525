"""`drctl agent`: a site agent. With a runbook whose site has a ``data_dir`` it runs the
data path of the site's services (sites/agent.py); otherwise it follows the records with
hooks only (failover/agent.py)."""

from __future__ import annotations

import argparse
import asyncio


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = sub.add_parser("agent", help="run a site agent (heartbeat, data path by role, hooks, "
                                     "self-fencing)")
    a.add_argument("--config", required=True, help="the runbook (or a cluster.yaml)")
    a.add_argument("--site", required=True)
    a.add_argument("--lag-url", help="metrics URL of a source agent this agent does not run "
                                     "itself (hook-driven sites)")
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
        asyncio.run(_daemon(cfg, lambda store: ManagedSiteAgent(cfg, args.site, store,
                                                                runbook)))
    else:
        asyncio.run(_daemon(cfg, lambda store: SiteAgent(cfg, args.site, store, args.lag_url)))
    return 0
