"""One metrics endpoint per site: `drctl agent --metrics-listen HOST:PORT`.

The data path's processes come and go with the site's role (a capture agent per service the
site is the primary of, the target daemon while it holds replicas), each serving its own
metrics on a loopback port the agent picks. Prometheus scrapes the agent instead: at each
scrape it reads its running children's metrics, merges the families (one family per name, every
sample labelled ``site``) and serves them, so one scrape target per site follows every role
change. A child that does not answer is left out of that scrape (it is starting or stopping).
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)
SCRAPE_TIMEOUT = 1.0  # per child; Prometheus' own scrape timeout is 10 s by default


def read_children(urls: Iterable[str], site: str) -> list[Any]:
    """The metric families of every child at ``urls`` that answers, merged by name."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, Metric] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as r:
                text = r.read().decode()
        except OSError as exc:
            log.debug("metrics of %s: %s", url, exc)
            continue
        for fam in text_string_to_metric_families(text):
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type)
            for s in fam.samples:
                labels = {"site": site, **s.labels}
                key = (s.name, tuple(sorted(labels.items())))
                if key not in seen:  # a series served twice (a child restarting) counts once
                    seen.add(key)
                    out.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
    return list(merged.values())


class ChildrenCollector:
    """A prometheus_client collector over the URLs ``urls()`` returns at scrape time."""

    def __init__(self, site: str, urls: Callable[[], list[str]]) -> None:
        self.site = site
        self.urls = urls

    def collect(self) -> Iterator[Any]:
        yield from read_children(self.urls(), self.site)

    def describe(self) -> Iterator[Any]:
        return iter(())  # unknown until scraped: not checked at registration


def serve(registry: CollectorRegistry, listen: str, tls_dir: str | None = None,
          site: str = "") -> str:
    """Serve ``registry`` on ``listen`` (HOST:PORT) from prometheus_client's own thread; with
    ``tls_dir``, over HTTPS with the site's certificate, scrapers presenting a client
    certificate from the deployment's CA. Returns the URL."""
    import ssl

    from drctl.argtypes import parse_hostport
    from drctl.metrics_http import MetricsEndpoint, MetricsTlsError, serve_registry
    from failover.config import ConfigError

    try:
        host, number = parse_hostport(listen)
        endpoint = (MetricsEndpoint.from_tls_dir(host, number, tls_dir, f"sites/{site}")
                    if tls_dir else MetricsEndpoint(host, number))
        serve_registry(registry, endpoint)
    except (OSError, ValueError, ssl.SSLError, MetricsTlsError) as exc:
        raise ConfigError(f"--metrics-listen {listen}: {exc}") from None
    return str(endpoint)
