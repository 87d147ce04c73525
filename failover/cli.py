"""`drctl controller`, `drctl failover|switchover|failback|retry|cancel|status`, `drctl api`
(and `drctl api users`), `drctl audit show|verify`: their parsers. The commands are in
failover/cli_control.py (controller, requests, status), failover/cli_api.py (api, api users)
and failover/cli_audit.py (audit); what they share in failover/cli_common.py.

Requests, controller decisions and agent role changes are appended to the audit log
(failover/audit.py); `record_audit()` appends one record from any other short-lived command.
"""

from __future__ import annotations

import argparse

from drctl.argtypes import hostport, natural, port
from failover.cli_api import cmd_api, cmd_users
from failover.cli_audit import cmd_audit_show, cmd_audit_verify

# used by other commands (drctl/certs_cli.py, sites/cli.py)
from failover.cli_common import _daemon as _daemon
from failover.cli_common import _load as _load
from failover.cli_common import cli_actor as cli_actor
from failover.cli_common import load_config as load_config
from failover.cli_common import record_audit as record_audit
from failover.cli_control import cmd_controller, cmd_request, cmd_status


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("controller", help="run a failover controller (one of them leads)")
    c.add_argument("--config", required=True)
    c.add_argument("--id", help="controller id (default: host-pid)")
    c.add_argument("--metrics-port", type=port, metavar="PORT",
                   help="serve the controller's metrics on 127.0.0.1:PORT")
    c.add_argument("--metrics-listen", type=hostport, metavar="HOST:PORT",
                   help="serve them on this address instead (Prometheus on another host)")
    c.add_argument("--metrics-tls", action="store_true",
                   help="serve them over HTTPS with TLS_DIR/servers/controller.crt and .key "
                   "(`drctl certs issue --server controller --host HOST`); scrapers need a "
                   "client certificate from the deployment's CA")
    c.add_argument("--audit-file", help=_AUDIT_FILE_HELP)
    key = c.add_mutually_exclusive_group()
    key.add_argument("--tls-dir", metavar="DIR",
                     help="the deployment directory (`drctl certs`): epoch tokens are signed "
                     "with DIR/epoch.key (default: $DRCTL_TLS_DIR; docs/security.md)")
    key.add_argument("--epoch-key", metavar="FILE", help="the epoch-token signing key itself")
    c.set_defaults(func=cmd_controller)

    for name, helptext in (("failover", "fail a service over to its replica site"),
                           ("switchover", "planned switchover: drain to zero lag first"),
                           ("failback", "planned switchover back to the configured primary"),
                           ("retry", "run a failed service's failed step again"),
                           ("cancel", "abandon a failed operation: back to healthy with the "
                                      "roles as recorded")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("service")
        p.add_argument("--config", required=True)
        if name == "failover":
            p.add_argument("--to", help="target site (default: the replica)")
            p.add_argument("--force", action="store_true",
                           help="fail over even beyond the RPO budget (accepts data loss)")
        p.add_argument("--audit-file", help=_AUDIT_FILE_HELP)
        p.set_defaults(func=cmd_request, request=name)

    _add_api_parser(sub)
    _add_audit_parser(sub)

    s = sub.add_parser("status", help="services, sites and the leading controller")
    s.add_argument("--config", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)


def _add_api_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    w = sub.add_parser("api", help="serve the HTTP API and the operator's web page (HTTPS); "
                                   "`drctl api users` manages its users")
    w.add_argument("--config", help="the cluster configuration or runbook (required to serve)")
    w.add_argument("--listen", default="127.0.0.1:8080", type=hostport, metavar="HOST:PORT")
    w.add_argument("--users", metavar="FILE", help="the users file (`drctl api users add`)")
    w.add_argument("--token-file", help="one more user, 'admin' (role admin), whose token is "
                   "this file's content (default: $DRCTL_API_TOKEN, if no --users)")
    w.add_argument("--tls-cert", metavar="FILE", help="the server certificate (PEM, chain)")
    w.add_argument("--tls-key", metavar="FILE", help="its private key (mode 0600: refused "
                   "if group or others may read it)")
    w.add_argument("--insecure", action="store_true", help="plain HTTP, only on a loopback "
                   "address (a warning is printed)")
    w.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="another origin allowed to POST (e.g. https://dr.example.com behind a "
                        "proxy); repeatable")
    w.add_argument("--audit-file", help=_AUDIT_FILE_HELP)
    w.set_defaults(func=cmd_api)
    users = w.add_subparsers(dest="api_command", metavar="users").add_parser(
        "users", help="add, remove or list the API's users")
    us = users.add_subparsers(dest="users_command", required=True, metavar="add|remove|list")
    add = us.add_parser("add", help="add a user; prints its new token once (the file keeps "
                                    "only a salted scrypt hash)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=["viewer", "operator", "admin"])
    add.add_argument("--replace", action="store_true", help="give an existing user a new "
                                                            "token (and this role)")
    rm = us.add_parser("remove", help="remove a user (its token stops working at once)")
    rm.add_argument("name")
    ls = us.add_parser("list", help="users and roles")
    for p in (add, rm, ls):
        p.add_argument("--file", required=True, help="the users file (created mode 0600)")
    for p in (add, rm):
        p.add_argument("--config", dest="users_config", help="also record the change in this "
                                                             "cluster's audit log")
        p.add_argument("--audit-file", dest="users_audit_file", help=_AUDIT_FILE_HELP)
        p.set_defaults(func=cmd_users)
    ls.set_defaults(func=cmd_users)


def _add_audit_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = sub.add_parser("audit", help="the hash-chained audit log: show it, verify it")
    verbs = a.add_subparsers(dest="audit_command", required=True, metavar="show|verify")
    show = verbs.add_parser("show", help="the records in etcd, oldest first")
    show.add_argument("--config", required=True)
    show.add_argument("--json", action="store_true", help="one JSON record per line")
    show.add_argument("--last", type=natural, metavar="N", help="only the last N records")
    show.set_defaults(func=cmd_audit_show)
    v = verbs.add_parser("verify", help="exit 0 if the chain verifies, 1 (one line naming "
                                        "the record) if one was edited, removed or reordered")
    v.add_argument("--config", help="verify the chain in this cluster's etcd")
    v.add_argument("--file", help="verify this local mirror (with --config: also that it "
                                  "matches etcd)")
    v.set_defaults(func=cmd_audit_verify)


_AUDIT_FILE_HELP = ("the local mirror of the audit log (default: $DRCTL_AUDIT_FILE, else "
                    "$XDG_STATE_HOME/drctl/audit/<cluster>-<chain id>.jsonl; 'none': no "
                    "mirror)")
