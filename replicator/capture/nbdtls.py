"""TLS on the NBD export (NBD_OPT_STARTTLS, FORCEDTLS mode of the NBD protocol document).

With TLS configured (``push --nbd-tls``), every connection must upgrade before anything else:
until the client's NBD_OPT_STARTTLS every option but NBD_OPT_ABORT is answered
NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME (which cannot be answered with an error) ends
the session. STARTTLS is answered NBD_REP_ACK, then the TLS handshake runs on the same
connection and the option haggling goes on inside it; there is no plaintext fallback.

Mutual TLS with the deployment's CA (drctl/pki.py). The server presents this process's site
certificate; the client must present a certificate from the same CA (TLS refuses one from
another CA, an expired one or none during the handshake), and the identity it names must be
one that may attach to the export:

  the export's own site       the site's hosts (its agent, or an application host given the
                              site's certificate)
  the operators named         ``--nbd-allow operator:NAME`` (repeatable; ``operator:*``: any
                              operator of the deployment): an application host or a person
                              given that operator certificate (``drctl certs issue --operator
                              NAME``: client authentication only, it cannot serve anything)

Any other certificate of the deployment is refused: another site's (a replica site must not
write the primary's volumes behind the replication's back), and an operator's not named (the
metrics scraper's, the API's): every option after the handshake is then answered
NBD_REP_ERR_POLICY with the reason, and NBD_OPT_EXPORT_NAME ends the session.

Plaintext cannot ride into the session: the server hangs up if anything follows the client's
STARTTLS before the handshake (bytes read ahead in plaintext would otherwise be taken as the
first options inside TLS, under the client's identity: a man in the middle's NBD_OPT_GO).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable

from cryptography import x509

from drctl.pki import Identity, identity_of
from replicator.errors import UsageError
from replicator.transport.security import TlsConfig

log = logging.getLogger(__name__)

OPT_STARTTLS = 5
REP_ERR_POLICY, REP_ERR_TLS_REQD = 2**31 + 2, 2**31 + 5
HANDSHAKE_TIMEOUT = 30.0


def parse_allow(items: Iterable[str]) -> frozenset[str]:
    """``--nbd-allow`` values (``operator:NAME`` or ``operator:*``): the operators who may
    attach besides the export's own site."""
    operators: set[str] = set()
    for item in items:
        kind, sep, name = item.partition(":")
        if kind != "operator" or not sep or not name:
            raise UsageError(f"--nbd-allow {item!r}: expected operator:NAME or operator:* (the "
                             "export's own site may always attach, no other site may)")
        operators.add(name)
    return frozenset(operators)


class ExportTls:
    """The export's TLS settings: the server context (the site's certificate, client
    certificates required from the deployment's CA) and who may attach: the own site and
    ``operators`` (``"*"``: any operator)."""

    def __init__(self, tls: TlsConfig, operators: Iterable[str] = ()) -> None:
        if tls.identity.kind != "site" or tls.files is None:
            raise ValueError(f"the NBD export's TLS needs a site certificate, not {tls.identity}")
        self.site = tls.identity.name
        self.operators = frozenset(operators)
        _ca, cert, key = tls.files
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=tls.ca.decode("ascii"))
        ctx.load_cert_chain(cert, key)
        self.context = ctx

    def refusal(self, who: Identity | None) -> str | None:
        """Why ``who`` may not attach (None: it may)."""
        if who is None:
            return "the client certificate names no drctl site or operator"
        if who == Identity("site", self.site):
            return None
        if who.kind == "operator" and ({"*", who.name} & self.operators):
            return None
        allowed = "".join(f", operator {o}" for o in sorted(self.operators))
        return f"{who} may not attach to site {self.site}'s export (site {self.site}{allowed} may)"


class TlsSession:
    """One connection's TLS state during the option haggling."""

    def __init__(self, tls: ExportTls | None, peer: object, reader: asyncio.StreamReader) -> None:
        self.tls = tls
        self.peer = peer
        self.reader = reader
        self.secure = False
        self.who: Identity | None = None
        self.refused: str | None = None  # the peer's identity may not attach

    @property
    def blocked(self) -> bool:
        """No export may be entered (yet): TLS is required and missing, or the peer may not
        attach."""
        return self.tls is not None and (not self.secure or self.refused is not None)

    def refuse(self) -> tuple[int, bytes] | None:
        """The error reply an option other than STARTTLS/ABORT gets (None: serve it)."""
        if self.tls is None:
            return None
        if not self.secure:
            return REP_ERR_TLS_REQD, (b"TLS required: this export takes NBD_OPT_STARTTLS "
                                      b"with a certificate of the deployment")
        if self.refused is not None:
            return REP_ERR_POLICY, self.refused.encode()
        return None

    async def start(self, w: asyncio.StreamWriter) -> None:
        """Run the handshake (after the ACK was sent) and read the peer's identity. An
        ``ssl.SSLError`` ends the session: there is no way back to plaintext. Bytes already read
        after the STARTTLS option end it too (ValueError): ``start_tls`` would keep them and
        they would be read as the first bytes inside TLS."""
        assert self.tls is not None
        # No await from here to start_tls, which stops reading the plaintext socket before
        # its first await: later bytes reach the TLS handshake (and fail it), not the reader.
        ahead = len(getattr(self.reader, "_buffer", b""))
        if ahead:
            raise ValueError(f"{ahead} bytes sent after NBD_OPT_STARTTLS before the TLS "
                             "handshake: not taken as TLS-protected, session ended")
        await w.start_tls(self.tls.context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        self.secure = True
        der = None
        sslobj = w.get_extra_info("ssl_object")
        if isinstance(sslobj, ssl.SSLObject):
            der = sslobj.getpeercert(binary_form=True)
        try:
            self.who = identity_of(x509.load_der_x509_certificate(der)) if der else None
        except ValueError:
            self.who = None
        self.refused = self.tls.refusal(self.who)
        if self.refused is not None:
            log.warning("nbd client %s: refused: %s", self.peer, self.refused)
        else:
            log.info("nbd client %s: TLS as %s", self.peer, self.who)
