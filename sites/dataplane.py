"""The data path a site agent runs, by role, for each service it holds (as Patroni runs
postgres): the site's replication target daemon (replicas of the services it is the replica
of) and, per service it is the primary of, a capture agent (the NBD export the application
writes through, and the push of its consistency points to the other site).

On disk, under the site's ``data_dir``:
  replicas/               the target daemon's directory; ``<volume>.img`` is the volume itself
                          (a symlink to the runbook's path), whichever the site's role
  push/<service>/         the capture agent's state: change journal, lineage, resume state
  unreplicated/<service>/ writes of this site that were never replicated, set aside at
                          demotion before the resync overwrote them
  tokens/<service>.token  the controller's epoch token from the service record (0600): the
                          capture agent presents it at each handshake, the promotion's Fence too
  logs/                   the children's output

Security (docs/security.md): with the agent's ``--tls-dir`` every child runs with the site's
certificate (mutual TLS); the target lets the other site of each service write that service's
volumes, this site fence its own replicas, and operators clone and read. A primary starts its
capture agent only once the record carries the controller's token for its epoch.

Role changes:
  primary   promote the local replica (Fence with release: complete points applied, epoch
            raised, the target stops serving it; its generation starts the journal's
            lineage), then start the capture agent at the service's epoch
  replica   stop the capture agent; if this site was primary, demote: replay its journal, set
            the unreplicated blocks aside, hand their list to the target (exact re-protect);
            make sure the target daemon runs
  fenced    stop the capture agent (its export stops acknowledging writes at once)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import time
import urllib.request
from typing import Any

from drctl.epochtoken import TokenError, parse
from drctl.localservers import free_port
from drctl.pki import Identity, write_private
from replicator.capture.lineage import Lineage
from replicator.demotion import demote, is_primary, mark_primary
from replicator.errors import ReplicatorError, UsageError
from replicator.source_state import group_journal_path
from replicator.transport.client import TargetClient
from replicator.transport.security import ChannelSecurity, TlsConfig, is_loopback, require_loopback
from runbooks.model import Runbook, Service
from sites.children import DRCTL, Child
from sites.divergence import collect

log = logging.getLogger(__name__)
BLOCK_SIZE = 4096


def volume_path(template: str, site: str) -> str:
    """A volume's path at ``site`` (``{site}`` is replaced: several sites on one host)."""
    return template.replace("{site}", site)


def named_ports(rb: Runbook) -> set[int]:
    """Every port the runbook gives a daemon (each site's endpoints, each NBD export): free
    while that daemon restarts, and never to be handed to another process of ours then."""
    from urllib.parse import urlsplit

    texts = [e for site in rb.sites.values() for e in site.endpoints.values()]
    texts += [e for svc in rb.services.values() for e in svc.export.values()]
    out = set()
    for text in texts:
        try:
            port = urlsplit(text).port if "://" in text else int(text.rpartition(":")[2])
        except ValueError:  # unix:PATH, or none
            continue
        if port:
            out.add(port)
    return out


def _port_open(hostport: str) -> bool:
    host, _, port = hostport.rpartition(":")
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


class ServiceDataPath:
    """One service's volumes at one site."""

    def __init__(self, plane: SiteDataPlane, svc: Service) -> None:
        self.plane = plane
        self.svc = svc
        self.site = plane.site
        self.volumes = [(v.name, os.path.abspath(volume_path(v.path, self.site)))
                        for v in svc.volumes]
        self.peer = svc.replica if self.site == svc.primary else svc.primary
        self.export = svc.export.get(self.site, "")
        self.push_root = os.path.join(plane.data_dir, "push", svc.name)
        self.push: Child | None = None
        self.push_epoch = 0
        self.metrics_port = 0
        self.barrier = False
        self.unreplicated = self._load_unreplicated()
        self.error = ""
        self.token_path = os.path.join(plane.data_dir, "tokens", f"{svc.name}.token")
        self.token = ""

    # -- paths -------------------------------------------------------------------------------

    @property
    def peer_endpoint(self) -> str:
        return self.plane.runbook.sites[self.peer].endpoints["replication"]

    @property
    def journal_path(self) -> str:
        return group_journal_path(self.push_root, self.svc.group, self.peer_endpoint,
                                  self.volumes)

    def _link_volumes(self) -> None:
        """``replicas/<volume>.img`` is the volume: the target keeps the replica in it."""
        os.makedirs(self.plane.replicas, exist_ok=True)
        for name, path in self.volumes:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            link = os.path.join(self.plane.replicas, f"{name}.img")
            if os.path.abspath(link) == path:
                continue
            if os.path.islink(link) and os.readlink(link) == path:
                continue
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(path, link)

    # -- roles -------------------------------------------------------------------------------

    def keep_token(self, token: str) -> None:
        """The record's epoch token, kept where the capture agent reads it."""
        if token and token != self.token:
            write_private(self.token_path, token.encode() + b"\n", overwrite=True)
            self.token = token

    def _granted(self, epoch: int) -> bool:
        """Does the kept token grant ``epoch`` of every volume to this site?"""
        try:
            t = (self.plane.tls.epoch_keys.verify(self.token)
                 if self.plane.tls is not None and self.plane.tls.epoch_keys is not None
                 else parse(self.token))
        except TokenError:
            return False
        return all(t.grants(self.site, name, epoch) for name, _ in self.volumes)

    async def become_primary(self, epoch: int) -> bool:
        if self.push is not None and self.push_epoch == epoch and self.push.running:
            return True
        if not await self._promote(epoch):
            return False
        self.start_push(epoch)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _port_open(self.export):
                return True
            if self.push is not None and not self.push.running and self.push.restarts:
                break
            await asyncio.sleep(0.05)
        self.error = f"the export did not come up on {self.export} (see {self._log('push')})"
        log.error("%s: %s", self.svc.name, self.error)
        return False

    async def _promote(self, epoch: int) -> bool:
        """The volumes become this site's: replicas are fenced at ``epoch`` with the
        controller's token and released, the journal's lineage starts."""
        if self.plane.tls is not None and not self._granted(epoch):
            error = f"waiting for the controller's epoch token for epoch {epoch}"
            if self.error != error:
                log.warning("%s: %s", self.svc.name, error)
            self.error = error
            return False
        self.error = ""
        await self.stop_push()
        self._link_volumes()
        promoted: dict[str, str] = {}
        for name, path in self.volumes:
            if is_primary(self.plane.replicas, name):
                continue
            if os.path.exists(os.path.join(self.plane.replicas, f"{name}.meta")):
                gen = await self.plane.promote_replica(name, epoch, self.token.encode())
                if gen is None:
                    return False
                promoted[name] = gen
            else:
                if not os.path.exists(path):
                    self.error = f"volume {name}: {path} does not exist"
                    log.error("%s: %s", self.svc.name, self.error)
                    return False
                mark_primary(self.plane.replicas, name, epoch)
        if promoted:
            # The journal starts now: it will hold every block written here since the
            # promotion of these replica generations (the exact delta of a re-protect).
            if os.path.exists(self.journal_path):
                self._set_aside_leftovers()
            shutil.rmtree(self.push_root, ignore_errors=True)
            Lineage(promoted_from=promoted).save(os.path.dirname(self.journal_path))
            log.info("%s: promoted %s at epoch %d", self.svc.name,
                     ", ".join(f"{n} (replica {g[:8]})" for n, g in promoted.items()), epoch)
        self.unreplicated = {}
        self._save_unreplicated()
        return True

    def _set_aside_leftovers(self) -> None:
        """A change journal left from before (a demotion that did not finish) is moved aside
        whole, never replayed: replaying it would write old blocks over the replica this site
        has just promoted."""
        where = os.path.join(self._aside_dir(), "leftover-" + time.strftime("%Y%m%dT%H%M%S"))
        os.makedirs(os.path.dirname(where), exist_ok=True)
        os.replace(self.push_root, where)
        log.warning("%s: a change journal left from an unfinished demotion was moved to %s "
                    "(not replayed)", self.svc.name, where)

    async def become_replica(self, epoch: int) -> bool:
        self.error = ""
        await self.stop_push()
        self._link_volumes()
        was_primary = os.path.exists(self.journal_path) or any(
            is_primary(self.plane.replicas, n) for n, _ in self.volumes)
        if was_primary:
            # replaying a journal and copying blocks aside is disk I/O: off the agent's loop
            await asyncio.to_thread(self.demote, epoch)
        self.plane.start_target()
        return True

    def demote(self, epoch: int) -> None:
        """This site's volumes become replicas of the other site's: replay and set aside what
        was never replicated, record what may differ for the target."""
        got = collect(self.journal_path, self.volumes, BLOCK_SIZE, self._aside_dir())
        for name, _path in self.volumes:
            demote(self.plane.replicas, name, BLOCK_SIZE, epoch, got.divergence[name])
        shutil.rmtree(self.push_root, ignore_errors=True)
        self.unreplicated = {"blocks": got.blocks, "file": got.saved_to or None,
                             "exact": not got.reason, "reason": got.reason, "epoch": epoch}
        self._save_unreplicated()
        if got.reason:
            log.warning("%s: demoted to replica at epoch %d; the divergence is unknown (%s): "
                        "the resync will compare both images", self.svc.name, epoch, got.reason)
        else:
            log.info("%s: demoted to replica at epoch %d; %d unreplicated blocks%s",
                     self.svc.name, epoch, got.blocks,
                     f" set aside in {got.saved_to}" if got.saved_to else "")

    async def fence(self, kill: bool = False) -> None:
        """Stop acknowledging writes: the capture agent stops (SIGKILL when the lease is
        about to be lost; the journal keeps every acknowledged write either way)."""
        await self.stop_push(signal.SIGKILL if kill else signal.SIGTERM)

    def set_barrier(self, on: bool) -> None:
        if self.push is None or not self.push.running or on == self.barrier:
            return
        self.push.send(signal.SIGUSR1 if on else signal.SIGUSR2)
        self.barrier = on
        log.info("%s: write barrier %s", self.svc.name, "up" if on else "lifted")

    # -- the capture agent -------------------------------------------------------------------

    def start_push(self, epoch: int) -> None:
        s = self.svc
        # not a port the runbook names: a site's own target, restarting, must find it free
        self.metrics_port = free_port(avoid=named_ports(self.plane.runbook))
        args = [*DRCTL, "--log-level", "INFO", "replicate", "push-group", "--group", s.group,
                "--to", self.peer_endpoint, "--nbd-listen", self.export,
                "--state-dir", self.push_root, "--epoch", str(epoch),
                "--compress-level", str(s.compress_level), "--cp-interval", str(s.cp_interval),
                "--journal-limit", str(s.journal_limit), "--rpo-budget", str(s.rpo),
                "--verify-rate", str(s.verify_rate), "--metrics-port", str(self.metrics_port)]
        if s.rate_limit:
            args += ["--rate-limit", str(s.rate_limit)]
        args += self.plane.security_args(self.peer)
        if self.plane.tls is not None or self.token:
            args += ["--epoch-token", self.token_path]
        host = self.export.rpartition(":")[0]
        if s.export_tls:
            args.append("--nbd-tls")  # mutual TLS with the site's certificate (security.md)
            args += [a for o in s.export_operators for a in ("--nbd-allow", f"operator:{o}")]
        elif not self.export.startswith("unix:") and not is_loopback(host):
            log.warning("%s: the NBD export %s is not on loopback: NBD has no authentication "
                        "or encryption (docs/security.md)", s.name, self.export)
            args.append("--insecure-nbd")
        args += [f"{n}={p}" for n, p in self.volumes]
        self.push = Child(f"{s.name} capture agent", args, self._log("push"))
        self.push_epoch = epoch
        self.barrier = False
        self.push.start()

    async def stop_push(self, sig: int = signal.SIGTERM) -> None:
        if self.push is not None:
            await self.push.stop(sig)
            self.push = None
        self.barrier = False

    def _log(self, what: str) -> str:
        return os.path.join(self.plane.data_dir, "logs", f"{what}-{self.svc.name}.log")

    def _aside_dir(self) -> str:
        return os.path.join(self.plane.data_dir, "unreplicated", self.svc.name)

    def _unreplicated_file(self) -> str:
        return os.path.join(self._aside_dir(), "last.json")

    def _load_unreplicated(self) -> dict[str, Any]:
        try:
            with open(self._unreplicated_file(), encoding="utf-8") as fh:
                out: dict[str, Any] = json.load(fh)
                return out
        except (OSError, ValueError):
            return {}

    def _save_unreplicated(self) -> None:
        os.makedirs(self._aside_dir(), exist_ok=True)
        with open(self._unreplicated_file(), "w", encoding="utf-8") as fh:
            json.dump(self.unreplicated, fh)

    # -- health ------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What the capture agent's metrics say (primary only); blocking (a thread)."""
        if self.push is None:
            return {"data_path": "stopped"}
        out: dict[str, Any] = {"data_path": self.push.state, "protected": False}
        if not self.push.running:
            return out
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                        timeout=1.0) as r:
                text = r.read().decode()
        except OSError:
            out["data_path"] = "starting"
            return out
        vals: dict[str, list[float]] = {}
        for line in text.splitlines():
            if line.startswith("drctl_replication_") and "{" in line:
                name = line.split("{", 1)[0][len("drctl_replication_"):]
                vals.setdefault(name, []).append(float(line.rsplit(" ", 1)[1]))
        lag = vals.get("lag_seconds")
        out["lag_seconds"] = round(max(lag), 3) if lag else None
        out["protected"] = bool(vals.get("protected")) and min(vals["protected"]) >= 1
        out["barrier"] = any(v >= 1 for v in vals.get("write_barrier", []))
        size = sum(vals.get("resync_size_bytes", []))
        if size:
            etas = [e for e in vals.get("resync_eta_seconds", []) if e >= 0]
            out["resync"] = {
                "mode": "exact" if min(vals.get("resync_exact", [0])) >= 1 else "hash",
                "bytes_total": int(size),
                "bytes_left": int(sum(vals.get("resync_remaining_bytes", []))),
                "eta_seconds": round(max(etas), 1) if etas else None}
        return out


class SiteDataPlane:
    """Every service's data path at one site, and the site's target daemon."""

    def __init__(self, runbook: Runbook, site: str, tls_dir: str | None = None) -> None:
        s = runbook.sites[site]
        assert s.data_dir is not None
        self.runbook = runbook
        self.site = site
        self.data_dir = s.data_dir
        self.replicas = os.path.join(s.data_dir, "replicas")
        self.endpoint = s.endpoints.get("replication", "")
        # None: plaintext (--insecure, loopback only)
        self.tls_dir = tls_dir
        self.tls = TlsConfig.from_dir(tls_dir, Identity("site", site), need_epoch_keys=True) \
            if tls_dir else None
        self.services = {n: ServiceDataPath(self, svc) for n, svc in runbook.services.items()
                         if svc.volumes and site in (svc.primary, svc.replica)}
        if self.tls is None:
            for path in self.services.values():
                require_loopback(path.peer_endpoint, f"site {path.peer}'s target")
            if self.services and self.endpoint:
                require_loopback(self.endpoint, "this site's target")
            tls_exports = sorted(n for n, p in self.services.items() if p.svc.export_tls)
            if tls_exports:
                raise UsageError(f"service {tls_exports[0]}: replication.export_tls serves the "
                                 "NBD export with the site's certificate: the agent needs "
                                 "--tls-dir")
        modes = {svc.mode for svc in runbook.services.values()
                 if svc.volumes and site in (svc.primary, svc.replica)}
        self.mode = modes.pop() if len(modes) == 1 else "hot"
        intervals = [svc.apply_interval for svc in runbook.services.values()
                     if svc.apply_interval and site in (svc.primary, svc.replica)]
        args = [*DRCTL, "--log-level", "INFO", "replicate", "serve", "--listen", self.endpoint,
                "--dir", self.replicas, "--mode", self.mode]
        if intervals:
            args += ["--apply-interval", str(min(intervals))]
        args += self.security_args(None)
        # the target's metrics: where the runbook says (sites.X.endpoints.target_metrics,
        # HOST:PORT), else a loopback port of the agent's choosing (`drctl agent
        # --metrics-listen` serves them with the capture agents' as the site's metrics)
        listen = s.endpoints.get("target_metrics") or f"127.0.0.1:{free_port()}"
        args += ["--metrics-listen", listen]
        host, _, port = listen.rpartition(":")
        self.target_metrics = f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        self.target = Child(f"site {site} replication target", args,
                            os.path.join(self.data_dir, "logs", "target.log"))

    def metrics_urls(self) -> list[str]:
        """The metrics endpoints of the children running now (sites/metrics.py)."""
        urls = [f"http://{self.target_metrics}/metrics"] if self.target.running else []
        return urls + [f"http://127.0.0.1:{p.metrics_port}/metrics"
                       for p in self.services.values() if p.push is not None and p.push.running]

    def start_target(self) -> None:
        if self.services and self.endpoint:
            os.makedirs(self.replicas, exist_ok=True)
            self.target.start()

    def security_args(self, peer: str | None) -> list[str]:
        """A child's flags: its certificate and, for a capture agent, the site its target is
        at (``peer``); for the target (``peer`` None), who may use it: the other site of each
        service writes that service's volumes, operators clone and read."""
        if self.tls_dir is None:
            return ["--insecure"]
        args = ["--tls-dir", self.tls_dir, "--site", self.site]
        if peer is not None:
            return [*args, "--target-site", peer]
        writers: dict[str, set[str]] = {}
        for path in self.services.values():
            writers.setdefault(path.peer, set()).update(n for n, _ in path.volumes)
        for peer_site, volumes in sorted(writers.items()):
            args += ["--allow", f"{peer_site}={','.join(sorted(volumes))}"]
        return [*args, "--allow", "operator:*"]

    async def promote_replica(self, volume: str, epoch: int, token: bytes = b"") -> str | None:
        """Fence the local replica at ``epoch`` with the controller's ``token`` and release it
        as the primary volume; its generation, or None if the target could not do it
        (retried at the next tick)."""
        self.start_target()
        deadline = time.monotonic() + 30
        while not _port_open(self.endpoint) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        client = TargetClient(self.endpoint if not self.endpoint.startswith("0.0.0.0:")
                              else "127.0.0.1:" + self.endpoint.rpartition(":")[2],
                              ChannelSecurity(self.tls, self.site))
        try:
            info = await client.fence(volume, epoch, timeout=60.0, release=True,
                                      epoch_token=token)
        except ReplicatorError as exc:
            log.error("promoting the replica of %s failed: %s", volume, exc)
            return None
        finally:
            await client.close()
        return info.generation

    async def close(self) -> None:
        for path in self.services.values():
            await path.stop_push()
        await self.target.stop()
