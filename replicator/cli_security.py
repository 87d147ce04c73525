"""The security and endpoint flags of `drctl replicate` (docs/security.md), read into what the
commands use: the channel's TLS material and peer, the NBD export's TLS and who may attach,
the metrics endpoint, and the checks of the addresses to listen on."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from drctl.argtypes import parse_hostport
from replicator.errors import UsageError

if TYPE_CHECKING:
    from replicator.metrics import MetricsEndpoint
    from replicator.transport.security import ChannelSecurity, TlsConfig


def identity(args: argparse.Namespace) -> tuple[str, str] | None:
    """Whose certificate a command uses: --site, --operator, else $DRCTL_TLS_AS (None:
    nobody said)."""
    if args.site:
        return "site", args.site
    if getattr(args, "operator", None):
        return "operator", args.operator
    who = os.environ.get("DRCTL_TLS_AS", "")
    if not who:
        return None
    from replicator.transport.security import identity_from_env

    i = identity_from_env(who)  # site/NAME or operator/NAME, else one line saying so
    return i.kind, i.name


def _tls(args: argparse.Namespace, serve: bool) -> TlsConfig | None:
    """The TLS material the flags name, None with --insecure (after a warning)."""
    from drctl.pki import Identity
    from replicator.transport.security import TlsConfig

    explicit = [f for f in (args.ca, args.cert, args.key) if f]
    if args.insecure:
        if args.tls_dir or explicit:
            raise UsageError("--insecure cannot be combined with --tls-dir/--ca/--cert/--key")
        print("drctl: warning: --insecure: the replication channel is plaintext and "
              "unauthenticated (loopback tests only)", file=sys.stderr)
        return None
    epoch_pub = getattr(args, "epoch_pub", None)
    if explicit:
        if len(explicit) != 3 or args.tls_dir:
            raise UsageError("--ca, --cert and --key go together (instead of --tls-dir)")
        if serve and not epoch_pub:
            raise UsageError("--ca/--cert/--key: a target also needs --epoch-pub FILE")
        return TlsConfig.from_files(args.ca, args.cert, args.key, epoch_pub)
    directory = args.tls_dir or os.environ.get("DRCTL_TLS_DIR")
    if not directory:
        raise UsageError("the replication channel is mutual TLS: give --tls-dir DIR --site "
                         "NAME (or --ca/--cert/--key); --insecure is for loopback tests only")
    if not os.path.isdir(directory):
        raise UsageError(f"{'--tls-dir' if args.tls_dir else '$DRCTL_TLS_DIR'} {directory}: "
                         "no such directory (`drctl certs init --dir DIR` makes one)")
    who = identity(args)
    if who is None:
        raise UsageError("--tls-dir needs --site NAME" + ("" if serve else " or --operator "
                                                                           "NAME"))
    tls = TlsConfig.from_dir(directory, Identity(*who), need_epoch_keys=serve and not epoch_pub)
    if epoch_pub:
        from dataclasses import replace

        from drctl.epochtoken import Verifier

        tls = replace(tls, epoch_keys=Verifier.load(epoch_pub))
    return tls


def _channel(args: argparse.Namespace) -> ChannelSecurity:
    from replicator.transport.security import ChannelSecurity

    tls = _tls(args, serve=False)
    if tls is None:
        _insecure(args.to, "target")
    return ChannelSecurity(tls, args.target_site)


def _insecure(address: str, what: str) -> None:
    from replicator.transport.security import require_loopback

    require_loopback(address, what)


def _check_nbd(spec: str, allowed: bool) -> None:
    """A non-loopback export needs TLS (--nbd-tls) or --insecure-nbd (``allowed``)."""
    from replicator.transport.security import is_loopback

    if spec.startswith("unix:") or allowed:
        return
    host = parse_hostport(spec)[0]
    if not is_loopback(host):
        raise UsageError(f"--nbd-listen {spec}: not a loopback address, and NBD without TLS "
                         "has no authentication or encryption: add --nbd-tls (clients then "
                         "need a certificate of the deployment), or --insecure-nbd to serve "
                         "it in the clear anyway")


def _nbd_tls(args: argparse.Namespace, security: ChannelSecurity) -> TlsConfig | None:
    """--nbd-tls: the export serves the process's own site certificate."""
    if not args.nbd_tls:
        return None
    tls = security.tls
    if tls is None:
        raise UsageError("--nbd-tls needs this process's certificate (--tls-dir DIR --site "
                         "NAME), not --insecure")
    if tls.identity.kind != "site":
        raise UsageError(f"--nbd-tls serves the export with a site's certificate: the "
                         f"certificate is for {tls.identity} (give --site NAME)")
    return tls


def _nbd_allow(args: argparse.Namespace) -> frozenset[str]:
    """--nbd-allow operator:NAME: who may attach to the TLS export besides its own site."""
    from replicator.capture.nbdtls import parse_allow

    if args.nbd_allow and not args.nbd_tls:
        raise UsageError("--nbd-allow names who may attach to the export over TLS: it needs "
                         "--nbd-tls")
    return parse_allow(args.nbd_allow)


def _metrics(args: argparse.Namespace, tls: TlsConfig | None) -> MetricsEndpoint | None:
    from replicator.metrics import MetricsEndpoint

    if args.metrics_listen:
        host, port = parse_hostport(args.metrics_listen)
        _check_listen("--metrics-listen", args.metrics_listen)
    elif args.metrics_port:
        host, port = "127.0.0.1", args.metrics_port
        _check_listen("--metrics-port", f"{host}:{port}")
    elif args.metrics_tls:
        raise UsageError("--metrics-tls needs --metrics-listen or --metrics-port")
    else:
        return None
    if not args.metrics_tls:
        return MetricsEndpoint(host, port)
    if tls is None or tls.files is None:
        raise UsageError("--metrics-tls needs this process's certificate (not --insecure)")
    ca, cert, key = tls.files
    return MetricsEndpoint(host, port, cert, key, ca)


def _check_listen(flag: str, spec: str) -> None:
    """Refuse an address this host cannot listen on now, before anything is made."""
    from drctl.listening import bind_problem

    host, port = parse_hostport(spec)
    problem = bind_problem(host, port)
    if problem:
        raise UsageError(f"{flag} {spec}: cannot listen there: {problem}")
