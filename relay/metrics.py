"""Prometheus metrics and a health endpoint, on their own small HTTP listener.

One registry per relay (no process-global state, so tests and reloads stay independent):

* ``signature_relay_messages_total{tenant, result}`` — one per message (DATA transaction), by the
  reply it got: ``accepted`` (2xx), ``deferred`` (4xx) or ``refused`` (5xx); tenant ``-`` when the
  message was not bound to one
* ``signature_relay_copies_total{tenant, decision}`` — one per copy delivered or queued (a message
  split by rules is several copies): ``stamped``, ``marked``, ``pass-through:<reason>``
* ``signature_relay_replies_total{code}`` — the replies given to Exchange Online after DATA
* ``signature_relay_delivery_errors_total{tenant, reason}`` — failed attempts to a tenant endpoint
  (inline and queue mode): ``tls`` (handshake, certificate or no STARTTLS), ``timeout``,
  ``unavailable``, ``dns``, ``deferred`` (a 4xx), ``refused`` (a 5xx), ``other``
* ``signature_relay_message_seconds`` — DATA received to reply, including inline delivery
* ``signature_relay_connections`` — sessions open now
* ``signature_relay_queued`` — copies waiting in the spool (queue mode, and DSNs spooled in inline mode)
* ``signature_relay_held`` — entries in the spool's ``hold/`` area, waiting for an operator
* ``signature_relay_queue_oldest_seconds`` — age of the oldest copy waiting in the spool (0 when empty)
* ``signature_relay_certificate_expiry_seconds{certificate}`` — seconds until each certificate the
  relay presents expires (``server``, ``tenant:<name>`` client certificates), read at scrape time
  so a renewed file shows at once; negative once expired; an unreadable file is left out (and logged)

``GET /healthz`` answers 200 while the SMTP listeners are open, 503 otherwise.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from relay import x509time

log = logging.getLogger("relay.metrics")


class Metrics:
    def __init__(self, connections: Callable[[], int], queued: Callable[[], int] = lambda: 0,
                 held: Callable[[], int] = lambda: 0,
                 certificates: Callable[[], Mapping[str, Path]] | None = None,
                 oldest: Callable[[], float] = lambda: 0.0) -> None:
        self.registry = CollectorRegistry()
        # Two counters, two units (issue #11: one counter mixed messages and copies).
        self.messages = Counter("signature_relay_messages", "Messages (DATA transactions) by tenant and result",
                                ["tenant", "result"], registry=self.registry)
        self.copies = Counter("signature_relay_copies", "Message copies by tenant and stamping decision",
                              ["tenant", "decision"], registry=self.registry)
        self.replies = Counter("signature_relay_replies", "Replies to DATA by code", ["code"],
                               registry=self.registry)
        self.delivery_errors = Counter("signature_relay_delivery_errors",
                                       "Failed delivery attempts to tenant endpoints by reason",
                                       ["tenant", "reason"], registry=self.registry)
        self.latency = Histogram("signature_relay_message_seconds", "DATA received to reply (incl. delivery)",
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
                                 registry=self.registry)
        g = Gauge("signature_relay_connections", "SMTP sessions open now", registry=self.registry)
        g.set_function(lambda: float(connections()))
        q = Gauge("signature_relay_queued", "Message copies waiting in the spool (queue mode)", registry=self.registry)
        q.set_function(lambda: float(queued()))
        h = Gauge("signature_relay_held", "Spool entries held for an operator (hold/)", registry=self.registry)
        h.set_function(lambda: float(held()))
        o = Gauge("signature_relay_queue_oldest_seconds", "Age of the oldest copy waiting in the spool",
                  registry=self.registry)
        o.set_function(oldest)

        if certificates is not None:
            self.registry.register(_CertificateExpiry(certificates))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CertificateExpiry(Collector):
    """A scrape-time collector: the files are read when Prometheus asks, never cached."""

    def __init__(self, certificates: Callable[[], Mapping[str, Path]]) -> None:
        self.certificates = certificates

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("signature_relay_certificate_expiry_seconds",
                              "Seconds until the certificate expires (negative: expired)", labels=["certificate"])
        now = dt.datetime.now(dt.UTC)
        for name, path in sorted(self.certificates().items()):
            try:
                expires = x509time.not_after(path.read_bytes())  # not cryptography: 10 MB per process
            except (OSError, ValueError) as e:
                log.warning("metrics: certificate %s (%s) unreadable: %s", name, path, e)
                continue
            g.add_metric([name], (expires - now).total_seconds())
        yield g


async def serve(host: str, port: int, metrics: Metrics, healthy: Callable[[], bool]) -> asyncio.Server:
    """A deliberately tiny HTTP/1.0 server: two GET routes, nothing else, no keep-alive."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)).strip():
                pass  # headers are not needed
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 and parts[0] == "GET" else ""
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, metrics.render()
            elif path == "/healthz":
                ok = healthy()
                status, ctype, body = ("200 OK" if ok else "503 Service Unavailable"), "text/plain", \
                    (b"ok\n" if ok else b"not serving\n")
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics or /healthz\n"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("metrics and health on http://%s:%s/metrics and /healthz", host, port)
    return server
