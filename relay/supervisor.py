"""``serve --workers N``: N relay processes sharing the listening ports, kept alive by a supervisor.

One Python process uses one core; a relay is CPU-bound (issue #14), so on an N-core host N
processes relay about N times as much. Each worker is a full relay (``serve --worker-index I``)
serving the listening sockets the supervisor bound once and passed on (``--listen-fds``): whichever
worker is idle accepts the next connection, and one that arrives while workers restart waits in the
socket's queue. (With ``SO_REUSEPORT`` each worker bound its own socket and the kernel hashed every
connection to one of them, busy or not: a tail of connections queued behind a busy worker, and a
worker's queue was reset when it died.) The supervisor (this module; it runs an event loop only for
a moment, to bind the sockets as asyncio binds them) does what a process manager would:

* **restarts** a worker that died (crash, OOM kill, ``kill -9``), with a back-off when it dies
  again within seconds, so a broken deployment does not spin; the others keep serving meanwhile;
* **forwards** ``SIGHUP`` (reload) and ``SIGTERM``/``SIGINT`` (drain: each worker answers
  ``421 4.3.2`` to new work and finishes what is in flight, ``listen.stop_grace``) and waits for
  them, killing only what outlives the grace period by 10 s;
* serves **one metrics endpoint** on ``[metrics] listen``: every worker's samples with a
  ``worker`` label (each worker listens on its own loopback port), plus
  ``signature_relay_workers`` and ``signature_relay_worker_restarts_total``; ``/healthz`` is 200
  only while every worker is healthy.

Each worker owns ``<delivery.spool_dir>/worker-<I>`` (queue mode, and DSNs spooled in inline
mode): two runners never see the same entry, and a restarted worker takes over exactly its
predecessor's spool (``queue --worker I`` manages it). Worker 0 also runs the dev sink when
``[sink] enabled``. Workers die with the supervisor (``PR_SET_PDEATHSIG``), never orphaned.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from relay.config import Config
from relay.smtp.server import bind_sockets

log = logging.getLogger("relay.supervisor")
BACKOFF_MAX = 30.0
QUICK_DEATH = 10.0  # a worker that dies sooner than this after its start backs off before the next


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies (Linux prctl(2))."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Worker:
    index: int
    metrics_port: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    restart_at: float = 0.0
    history: list[int] = field(default_factory=list)  # pids, oldest first


class Supervisor:
    def __init__(self, cfg: Config, argv: Sequence[str], workers: int, no_sink: bool) -> None:
        self.cfg = cfg
        self.argv = list(argv)  # the serve arguments to pass on (config, logging)
        self.no_sink = no_sink
        self.workers = [Worker(i, _free_loopback_port()) for i in range(workers)]
        self.stopping = False
        self._lock = threading.Lock()
        self._http: http.server.ThreadingHTTPServer | None = None
        self.sockets: list[list[int]] = []  # per listener, the listening sockets' descriptors (start)

    # --- processes ------------------------------------------------------------------------------

    def _spawn(self, w: Worker) -> None:
        cmd = [sys.executable, "-m", "relay", "serve", *self.argv, "--worker-index", str(w.index),
               "--worker-metrics-port", str(w.metrics_port), "--listen-fds", fds_arg(self.cfg, self.sockets)]
        if self.no_sink or w.index:
            cmd.append("--no-sink")
        # our own interpreter and module, arguments from our own command line; preexec only calls prctl(2)
        w.proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent,  # noqa: S603
                                  pass_fds=[fd for group in self.sockets for fd in group])
        w.started = time.monotonic()
        w.history.append(w.proc.pid)
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    def start(self) -> None:
        # The listening sockets are bound here, once, and every worker serves the same ones: an
        # idle worker takes the next connection, where SO_REUSEPORT hashed each connection to one
        # worker whether or not it was busy (a tail of queued connections behind a busy one), and a
        # worker that dies or restarts leaves nothing in an accept queue of its own to be reset.
        self.sockets = bind_sockets(self.cfg.listeners)
        for w in self.workers:
            self._spawn(w)
        if self.cfg.metrics_listen:
            self._serve_metrics(*self.cfg.metrics_listen)

    def poll(self) -> None:
        """Restart dead workers (with back-off when they die young)."""
        now = time.monotonic()
        for w in self.workers:
            if w.proc is None or self.stopping:
                continue
            rc = w.proc.poll()
            if rc is None:
                continue
            if w.restart_at == 0.0:
                lived = now - w.started
                w.backoff = min(BACKOFF_MAX, max(1.0, w.backoff * 2)) if lived < QUICK_DEATH else 0.0
                w.restart_at = now + w.backoff
                log.error("worker %d (pid %d) exited with %s after %.0f s; restarting%s", w.index, w.proc.pid,
                          _exit_text(rc), lived, f" in {w.backoff:.0f} s" if w.backoff else "")
            if now >= w.restart_at:
                w.restart_at = 0.0
                w.restarts += 1
                self._spawn(w)

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    def stop(self) -> None:
        """Drain: SIGTERM to every worker, wait for them (stop_grace + 10 s), then kill the rest."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.stop_grace + 10.0
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d (pid %d) still running after the grace period; killing it", w.index,
                            w.proc.pid)
                w.proc.kill()
                w.proc.wait()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def run(self) -> int:
        """Until SIGTERM/SIGINT: poll the workers, forward SIGHUP."""
        stop = threading.Event()
        hup = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, lambda *_: hup.set())
        self.start()
        while not stop.wait(0.2):
            if hup.is_set():
                hup.clear()
                log.info("SIGHUP: asking %d worker(s) to reload", len(self.workers))
                self.signal_all(signal.SIGHUP)
            self.poll()
        log.info("shutting down %d worker(s) (finishing messages in flight)", len(self.workers))
        self.stop()
        return 0

    # --- one metrics endpoint -------------------------------------------------------------------

    def _serve_metrics(self, host: str, port: int) -> None:
        registry = CollectorRegistry()
        registry.register(_WorkersCollector(self))
        sup = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                elif self.path.startswith("/healthz"):
                    ok = sup.healthy()
                    body, status, ctype = (b"ok\n" if ok else b"unhealthy\n"), (200 if ok else 503), "text/plain"
                else:
                    body, status, ctype = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._http = http.server.ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self._http.serve_forever, daemon=True, name="metrics").start()
        log.info("metrics and health for %d worker(s) on http://%s:%d/metrics and /healthz", len(self.workers),
                 host, port)

    def healthy(self) -> bool:
        for w in self.workers:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{w.metrics_port}/healthz", timeout=2) as r:
                    if r.status != 200:
                        return False
            except OSError:
                return False
        return True


class _WorkersCollector(Collector):
    """Every worker's metrics with a ``worker`` label, and the supervisor's own."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def collect(self) -> Any:
        families: dict[str, Metric] = {}
        alive = 0
        for w in self.sup.workers:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{w.metrics_port}/metrics", timeout=2) as r:
                    text = r.read().decode("utf-8")
            except OSError:
                continue  # a worker being restarted: its samples are missing from this scrape
            alive += 1
            for fam in text_string_to_metric_families(text):
                out = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "worker": str(w.index)}, s.value, s.timestamp, s.exemplar)
        yield from families.values()
        yield GaugeMetricFamily("signature_relay_workers", "Worker processes answering now", value=alive)
        restarts = CounterMetricFamily("signature_relay_worker_restarts", "Times each worker was restarted",
                                       labels=["worker"])
        for w in self.sup.workers:
            restarts.add_metric([str(w.index)], w.restarts)
        yield restarts


def _exit_text(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-rc).name}"
    return f"status {rc}"


def worker_config(cfg: Config, index: int, metrics_port: int, listen_fds: str = "") -> Config:
    """A worker's view of the configuration: its own spool and loopback metrics port, and the
    listening sockets it inherited (``listen_fds`` as :func:`fds_arg` wrote it)."""
    import dataclasses

    delivery = dataclasses.replace(cfg.delivery, spool_dir=cfg.delivery.spool_dir / f"worker-{index}")
    sockets = []
    for group in filter(None, listen_fds.split(";")):
        where, _, fds = group.partition("=")
        host, _, port = where.rpartition("|")
        sockets.append(((host, int(port)), tuple(int(fd) for fd in fds.split(",") if fd)))
    return dataclasses.replace(cfg, delivery=delivery, metrics_listen=("127.0.0.1", metrics_port),
                               listen_sockets=tuple(sockets))


def fds_arg(cfg: Config, fds: list[list[int]]) -> str:
    """``--listen-fds``: per listener "host|port=fd,fd" (the descriptors :func:`bind_sockets`
    returned for it), listeners separated by ";"."""
    return ";".join(f"{lst.host}|{lst.port}=" + ",".join(str(fd) for fd in group)
                    for lst, group in zip(cfg.listeners, fds, strict=True))
