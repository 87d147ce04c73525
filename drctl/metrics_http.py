"""Where and how a drctl process serves its Prometheus metrics: one endpoint type and one
server for every daemon (target, capture agent, site agent, controller).

Plain HTTP, or HTTPS with the process's certificate that, given the deployment's CA, asks every
scraper for a client certificate from it (``drctl certs issue --operator prometheus``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where the metrics are served: ``host``:``port``, plain HTTP or, with ``certfile`` and
    ``keyfile``, HTTPS that asks for a client certificate from ``client_ca``."""

    host: str
    port: int
    certfile: str | None = None
    keyfile: str | None = None
    client_ca: str | None = None

    def __str__(self) -> str:
        scheme = "https" if self.certfile else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/metrics"

    @classmethod
    def from_tls_dir(cls, host: str, port: int, tls_dir: str, who: str) -> MetricsEndpoint:
        """HTTPS with ``who``'s certificate (``sites/east``, ``servers/controller``) from a
        `drctl certs` directory; scrapers need a client certificate from its CA."""
        cert, key = (os.path.join(tls_dir, f"{who}.{ext}") for ext in ("crt", "key"))
        for path in (cert, key, os.path.join(tls_dir, "ca.crt")):
            if not os.path.isfile(path):
                raise MetricsTlsError(f"metrics over HTTPS need {path} (drctl certs issue)")
        return cls(host, port, cert, key, os.path.join(tls_dir, "ca.crt"))


class MetricsTlsError(ValueError):
    """The certificate files for HTTPS metrics are missing."""


def serve_registry(registry: CollectorRegistry, endpoint: MetricsEndpoint) -> None:
    """Serve ``registry`` at ``endpoint`` from prometheus_client's own daemon thread. Raises
    OSError when the address cannot be bound, ssl.SSLError on unusable certificates."""
    from prometheus_client import start_http_server

    start_http_server(endpoint.port, addr=endpoint.host, registry=registry,
                      certfile=endpoint.certfile, keyfile=endpoint.keyfile,
                      client_cafile=endpoint.client_ca,
                      client_auth_required=endpoint.client_ca is not None)
