"""`drctl deploy systemd`: the systemd units a host of a deployment runs, made from its runbook.

A site host runs the site agent (`drctl agent`, which runs the data path of the site's role
itself: the replication target, and at the primary a capture agent per service) and one of the
controllers; a witness host (`--witness`) runs a controller only; either may run the API
(`--api HOST:PORT`). Every unit runs as a dedicated user under systemd's sandbox (the file
system read-only but for the state the process writes), is restarted when it dies, and is
stopped the way the daemons shut down: SIGTERM to the main process, which stops its children
in order, then SIGKILL for whatever is left in the cgroup after ``TimeoutStopSec``. No secret
is written into a unit: the runbook names files (read by the unit's user) or environment
variables (set in ``--env-file``, read by systemd as root before it drops privileges).

Beside the units: ``drctl.sysusers.conf`` (the user) and ``drctl.tmpfiles.conf`` (the
directories it writes), for systemd-sysusers and systemd-tmpfiles. docs/deployment.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from drctl.argtypes import hostport

if TYPE_CHECKING:
    from runbooks.model import Runbook

CHILD_STOP = 10  # seconds a site agent gives each child (sites/children.py Child.stop)
SPECIAL = set(" \t\n\"'\\;")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("deploy", help="generate what a host of a deployment runs")
    dsub = d.add_subparsers(dest="deploy_cmd", required=True, metavar="COMMAND")
    s = dsub.add_parser("systemd", help="systemd units for one host: a site's agent and "
                        "controller (or a witness's controller), the API where asked")
    s.add_argument("--config", required=True, metavar="RUNBOOK",
                   help="the runbook, at the path the host keeps it (the units name it)")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--site", metavar="NAME", help="a site host: agent and controller")
    where.add_argument("--witness", action="store_true",
                       help="a host in a third failure domain: a controller only")
    s.add_argument("--out", metavar="DIR", help="write the files here (default: print them)")
    s.add_argument("--tls-dir", default="/etc/drctl/tls", metavar="DIR",
                   help="the host's TLS directory (`drctl certs`; default: %(default)s)")
    s.add_argument("--user", default="drctl", help="the user the units run as "
                   "(default: %(default)s)")
    s.add_argument("--drctl", metavar="PATH",
                   help="the drctl executable (default: the one running this command)")
    s.add_argument("--env-file", default="/etc/drctl/drctl.env", metavar="FILE",
                   help="environment for the secrets the runbook names by variable (mode "
                        "0600, root's; default: %(default)s)")
    s.add_argument("--no-controller", action="store_true",
                   help="a site host without a controller")
    s.add_argument("--agent-metrics", type=hostport, metavar="HOST:PORT",
                   help="where the site agent serves the site's metrics")
    s.add_argument("--controller-metrics", type=hostport, metavar="HOST:PORT",
                   help="where the controller serves its metrics")
    s.add_argument("--api", type=hostport, metavar="HOST:PORT",
                   help="also run the API (HTTPS) here")
    s.add_argument("--api-users", default="/etc/drctl/api-users.json", metavar="FILE",
                   help="the API's users file (`drctl api users add`; default: %(default)s)")
    s.set_defaults(func=cmd_systemd)


@dataclass(frozen=True)
class Host:
    """What one host runs, and as what."""

    runbook: Runbook
    config: str  # the runbook's absolute path on the host
    site: str | None  # None: a witness
    drctl: str
    user: str
    tls_dir: str
    env_file: str
    controller: bool = True
    agent_metrics: str | None = None
    controller_metrics: str | None = None
    api: str | None = None
    api_users: str = "/etc/drctl/api-users.json"

    @property
    def services(self) -> list[str]:
        """The services with volumes this site holds (each may run a capture agent)."""
        return [n for n, s in self.runbook.services.items()
                if s.volumes and self.site in (s.primary, s.replica)]

    @property
    def data_dir(self) -> str | None:
        return self.runbook.sites[self.site].data_dir if self.site else None

    def volume_paths(self) -> list[str]:
        from runbooks.plan import volume_path

        assert self.site is not None
        return sorted({volume_path(v.path, self.site) for n in self.services
                       for v in self.runbook.services[n].volumes})


def sd_quote(arg: str) -> str:
    """One argument of an ExecStart= line (systemd's own quoting and specifiers)."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not SPECIAL & set(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _files_read(h: Host) -> list[str]:
    """Files a daemon reads that its user must be able to read (the runbook names them)."""
    rb = h.runbook
    creds = rb.etcd_credentials
    files = [h.config, h.tls_dir]
    files += [f for f in (creds.password_file, creds.ca, creds.cert, creds.key) if f]
    files += [z.tsig_file for z in rb.zones.values() if z.tsig_file]
    # relative paths in the runbook: from its directory (the units' WorkingDirectory=)
    return [os.path.join(os.path.dirname(h.config), f) for f in files]


def _env_names(h: Host) -> list[str]:
    rb = h.runbook
    names = [rb.etcd_credentials.password_env] + [z.tsig_env for z in rb.zones.values()]
    return sorted({n for n in names if n})


def _hooks(h: Host, where: set[str]) -> list[str]:
    """The hook commands the runbook runs where ``where`` says (as the unit's user)."""
    out = []
    for svc in h.runbook.services.values():
        if h.site is not None and "controller" not in where \
                and h.site not in (svc.primary, svc.replica):
            continue
        out += [f"{svc.name}: {s.run}" for s in svc.steps if s.run and str(s.on) in where]
    return out


def _unit(h: Host, what: str, about: list[str], argv: list[str], stop_seconds: int,
          writes: list[str], env: dict[str, str], groups: list[str]) -> str:
    rb = h.runbook
    lines = [f"# Generated by `drctl deploy systemd` from {h.config}.", *about]
    read = _files_read(h)
    lines.append(f"# User {h.user} reads: {', '.join(read)}.")
    names = _env_names(h)
    if names:
        lines.append(f"# {h.env_file} (root's, mode 0600) sets {', '.join(names)}.")
    where = "controller" if what == "controller" else "old_primary new_primary"
    hooks = _hooks(h, set(where.split())) if what != "api" else []
    if hooks:
        lines.append(f"# Runbook hooks it runs as {h.user} (NoNewPrivileges: no sudo; allow "
                     "what they need with a polkit rule):")
        lines += [f"#   {hook}" for hook in hooks]
    host = f"site {h.site}" if h.site else "witness"
    lines += ["[Unit]", f"Description=drctl {what} (cluster {rb.cluster}, {host})",
              "Wants=network-online.target", "After=network-online.target",
              "StartLimitIntervalSec=0", "", "[Service]", "Type=exec",
              f"User={h.user}", f"Group={h.user}",
              "# relative paths in the runbook are read from its directory",
              "WorkingDirectory=" + os.path.dirname(h.config).replace("%", "%%")]
    if groups:
        lines.append(f"SupplementaryGroups={' '.join(groups)}")
    lines.append("ExecStart=" + " ".join(sd_quote(a) for a in [h.drctl, "--log-level", "INFO",
                                                                *argv]))
    env = {"DRCTL_TLS_DIR": h.tls_dir, "XDG_STATE_HOME": "%S", **env}  # %S: /var/lib
    lines += [f"Environment={k}={v}" for k, v in env.items()]
    lines += [f"EnvironmentFile=-{h.env_file}",
              "# SIGTERM to the daemon, which shuts down in order; then SIGKILL to the cgroup",
              "KillMode=mixed", "KillSignal=SIGTERM", f"TimeoutStopSec={stop_seconds}",
              "Restart=always", "RestartSec=2",
              "# no RestartPreventExitStatus=: exit status 2 is a configuration error but also",
              "# an address not assigned yet at boot (cannot listen there), which a restart mends",
              "StateDirectory=drctl", "StateDirectoryMode=0750", "UMask=0077",
              "NoNewPrivileges=yes", "ProtectSystem=strict"]
    if writes:
        lines.append("ReadWritePaths=" + " ".join(sd_quote(w) for w in writes))
    home = ("/home/", "/root/", "/run/user/")
    if not any(w.lstrip("-").rstrip("/") + "/" == p or w.lstrip("-").startswith(p)
               for w in writes for p in home):
        lines.append("ProtectHome=yes")
    if "disk" not in groups:  # ProtectClock= implies a DeviceAllow= list: no block devices
        lines.append("ProtectClock=yes")
    lines += ["PrivateTmp=yes", "ProtectKernelTunables=yes",
              "ProtectKernelModules=yes", "ProtectKernelLogs=yes", "ProtectControlGroups=yes",
              "ProtectHostname=yes", "RestrictSUIDSGID=yes",
              "RestrictRealtime=yes", "RestrictNamespaces=yes", "LockPersonality=yes",
              "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
              "", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def agent_unit(h: Host) -> str:
    assert h.site is not None and h.data_dir is not None
    argv = ["agent", "--config", h.config, "--site", h.site, "--tls-dir", h.tls_dir]
    if h.agent_metrics:
        argv += ["--metrics-listen", h.agent_metrics]
    paths = h.volume_paths()
    devices = [p for p in paths if p.startswith("/dev/")]
    writes = [] if h.data_dir.startswith("/var/lib/drctl") else [h.data_dir]
    writes += sorted({"-" + os.path.dirname(p) for p in paths if p not in devices})
    about = [f"# Site {h.site}'s agent: its heartbeat lease, role changes and self-fencing, and "
             "the data path of its", "# role as children that die with it (the replication "
             "target; at the primary, a capture", "# agent per service: the NBD export the "
             "application writes through). Stopped at the", "# primary, its exports stop "
             "acknowledging writes and the services fail over once its lease", "# lapses: "
             "move them first (drctl switchover)."]
    # children stop one after another (CHILD_STOP each: capture agents, then the target)
    stop = CHILD_STOP * (len(h.services) + 1) + 15
    return _unit(h, "site agent", about, argv, stop, writes, {},
                 ["disk"] if devices else [])


def controller_unit(h: Host) -> str:
    argv = ["controller", "--config", h.config, "--tls-dir", h.tls_dir]
    if h.controller_metrics:
        argv += ["--metrics-listen", h.controller_metrics]
    about = ["# A failover controller: one of the deployment's controllers leads (an etcd "
             "lease), watches", "# the sites and runs failovers; it signs epoch tokens with "
             f"{h.tls_dir}/epoch.key."]
    return _unit(h, "controller", about, argv, 30, [], {}, [])


def api_unit(h: Host) -> str:
    assert h.api is not None
    argv = ["api", "--config", h.config, "--listen", h.api, "--users", h.api_users,
            "--tls-cert", f"{h.tls_dir}/servers/api.crt",
            "--tls-key", f"{h.tls_dir}/servers/api.key"]
    about = ["# The HTTP API and the operator's page (HTTPS); drills connect to the standby's "
             "target as", f"# operator api ({h.tls_dir}/operators/api.crt). Its users: "
             f"{h.api_users} (`drctl api users add`)."]
    return _unit(h, "api", about, argv, 30, [], {"DRCTL_TLS_AS": "operator/api"}, [])


def support_files(h: Host) -> dict[str, str]:
    """systemd-sysusers and systemd-tmpfiles configuration: the user, what it writes."""
    devices = h.site is not None and any(p.startswith("/dev/") for p in h.volume_paths())
    users = [f'u {h.user} - "drctl DR agent" /var/lib/drctl']
    if devices:
        users.append(f"m {h.user} disk")
    dirs = ["/var/lib/drctl"]
    if h.site is not None and h.data_dir is not None:
        dirs.append(h.data_dir)
        dirs += [os.path.dirname(p) for p in h.volume_paths() if not p.startswith("/dev/")]
    tmp = [f"d {d} 0750 {h.user} {h.user} -" for d in dict.fromkeys(dirs)]
    head = "# Generated by `drctl deploy systemd`.\n"
    return {"drctl.sysusers.conf": head + "\n".join(users) + "\n",
            "drctl.tmpfiles.conf": head + "\n".join(tmp) + "\n"}


def units(h: Host) -> dict[str, str]:
    """Every file for the host, by name."""
    out: dict[str, str] = {}
    if h.site is not None:
        out["drctl-agent.service"] = agent_unit(h)
    if h.controller:
        out["drctl-controller.service"] = controller_unit(h)
    if h.api:
        out["drctl-api.service"] = api_unit(h)
    out.update(support_files(h))
    return out


def _host(args: argparse.Namespace) -> Host:
    from failover.config import ConfigError
    from runbooks.loader import RunbookError, load

    try:
        runbook = load(args.config)
    except RunbookError as exc:
        raise ConfigError(str(exc)) from None
    if args.site is not None:
        if args.site not in runbook.sites:
            raise ConfigError(f"--site {args.site}: not in {args.config} (sites: "
                              f"{', '.join(sorted(runbook.sites))})")
        if not runbook.sites[args.site].data_dir:
            raise ConfigError(f"--site {args.site}: the site has no data_dir in "
                              f"{args.config}: its agent would run no data path")
    if args.witness and (args.no_controller or args.agent_metrics):
        raise ConfigError("--witness runs a controller only")
    drctl = args.drctl or shutil.which("drctl") or os.path.join(
        os.path.dirname(sys.executable), "drctl")
    return Host(runbook, os.path.abspath(args.config), args.site, os.path.abspath(drctl),
                args.user, os.path.abspath(args.tls_dir), args.env_file,
                not args.no_controller, args.agent_metrics, args.controller_metrics, args.api,
                args.api_users)


def cmd_systemd(args: argparse.Namespace) -> int:
    files = units(_host(args))
    if not args.out:
        for name, text in files.items():
            print(f"# ---- {name}\n{text}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as fh:
            fh.write(text)
    names = [n for n in files if n.endswith(".service")]
    print(f"wrote {', '.join(files)} to {args.out}; install them with:\n"
          f"  cp {args.out}/*.service /etc/systemd/system/\n"
          f"  install -Dm644 {args.out}/drctl.sysusers.conf /etc/sysusers.d/drctl.conf\n"
          f"  install -Dm644 {args.out}/drctl.tmpfiles.conf /etc/tmpfiles.d/drctl.conf\n"
          "  systemd-sysusers && systemd-tmpfiles --create\n"
          f"  systemctl daemon-reload && systemctl enable --now {' '.join(names)}")
    return 0
