"""End-to-end benchmark (issue #14): the relay against real baselines, measured in the same run.

    make bench-e2e                      # or: .venv/bin/python benchmarks/e2e.py [--quick]

Starts everything itself on loopback in a private directory and sends the same messages with
Postfix's ``smtp-source`` through each system into Postfix's ``smtp-sink``:

* ``direct``      smtp-source → smtp-sink (the ceiling: what the load generator and sink can do);
* ``postfix``     Postfix as a plain relay (its own instance: ``postfix -c <dir>``);
* ``altermime``   Postfix with alterMIME as a pipe content filter (FILTER.README's simple filter;
  the filtered message is re-injected over SMTP into a filter-free listener, because Postfix's
  ``sendmail -C`` refuses a private configuration directory to an unprivileged user);
* ``relay``       signature-relay, stamping, in a benchmark profile that turns STARTTLS off on
  loopback on both sides (``require_starttls = false``; ``[delivery]
  plaintext_loopback_benchmark = true``), so it is compared like with like with plaintext Postfix.

Before timing, a few messages go through each system into a sink that keeps them, and the harness
checks that alterMIME's output carries its footer and the relay's the signature (the baselines do
real work). Writes ``benchmarks/RESULTS.md`` (machine, versions, date, every figure and its ratio
to the baselines of the same run). Needs Debian's ``postfix`` and ``altermime`` (``make bench-deps``).

Then the same systems (and the relay with ``--workers 2``) with STARTTLS on both sides, driven by
``benchmarks/loadgen.py`` (smtp-source has no TLS) into a Postfix TLS sink that discards, and open-
loop latency at 50 % and 80 % of each system's maximum (loadgen.py ``--rate``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import platform
import re
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from run import outlook_reply, outlook_reply_from_exchange_online, with_attachment  # noqa: E402

from tests.support import free_port, wait_port  # noqa: E402

VENV_BIN = Path(sys.executable).parent
SENDER, RCPT = "alice@contoso.com", "bob@example.net"
FILTER_USER = "srbench"  # Postfix's pipe(8) refuses to run a filter as root
SIG_MARK = b"Wilber"  # Alice's surname appears only in her signature, never in the test messages
FOOTER_MARK = b"altermime-bench-footer"


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if not path:
        raise SystemExit(f"e2e benchmark: {tool} not found; run `make bench-deps` (Debian: postfix altermime)")
    return path


# --- messages ---------------------------------------------------------------------------------


def html_with_images(size: int = 200_000) -> bytes:
    """A 200 KB HTML message with two inline (cid:) images, as Outlook sends a newsletter-style mail."""
    import base64

    img = base64.encodebytes(os.urandom((size // 2 - 4000) * 3 // 4)).replace(b"\n", b"\r\n")
    html = (b"<html><body><p>Quarterly update</p>" + b"<p>Figures and commentary.</p>" * 60 +
            b'<img src="cid:i1@x"><img src="cid:i2@x"></body></html>\r\n')
    parts = [b"--r\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html]
    for i in (1, 2):
        parts.append(b"--r\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n"
                     b"Content-ID: <i%d@x>\r\nContent-Disposition: inline\r\n\r\n" % i + img)
    return (b"From: Alice <alice@contoso.com>\r\nTo: bob@example.net\r\nSubject: update\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/related; boundary="r"; type="text/html"\r\n\r\n' + b"".join(parts) + b"--r--\r\n")


CORPORA = ROOT / "tests" / "data"
_ORIGIN_FIELDS = re.compile(rb"(?im)^(?:from|sender|x-ms-exchange-crosstenant-id)[ \t]*:.*\n(?:[ \t].*\n)*")


def real_mail_mix(dest: Path) -> tuple[int, int]:
    """Every message of the public corpora in tests/data (the reply corpus; mail-parser,
    flufl.bounce and CPython's test messages: licences in their READMEs), real mail nobody on this
    team wrote, as files in ``dest`` for loadgen.py to send in turn. Each gets ``From: Alice
    <alice@contoso.com>`` instead of its own From:/Sender: (and loses any cross-tenant id), so the
    relay binds it to the sample tenant and its rules apply; nothing else is changed. A message the
    relay would refuse at ingress (over its header limits, a NUL in the header) or as a loop is
    left out: every system must be able to take every message. Returns (used, left out)."""
    from relay import ingress
    from relay.errors import RelayError

    dest.mkdir(parents=True, exist_ok=True)
    used = left_out = 0
    for src in sorted((CORPORA / "replies").rglob("*.eml")) + sorted((CORPORA / "corpus").rglob("*.eml")):
        raw = src.read_bytes().replace(b"\r\n", b"\n")
        if raw.startswith(b"From "):  # an mbox separator line, not a header field
            raw = raw.split(b"\n", 1)[1]
        end = raw.find(b"\n\n")
        head, body = (raw[:end + 1], raw[end + 1:]) if end >= 0 else (raw, b"")
        raw = b"From: Alice <alice@contoso.com>\n" + _ORIGIN_FIELDS.sub(b"", head) + body
        try:
            inbound = ingress.accept(raw.replace(b"\n", b"\r\n"), ingress.IngressLimits())
        except RelayError:
            left_out += 1
            continue
        if len(inbound.top.get("received", ())) >= 50:
            left_out += 1
            continue
        (dest / f"{used:04d}.eml").write_bytes(raw)
        used += 1
    return used, left_out


# --- processes --------------------------------------------------------------------------------


class Sink:
    """Postfix's smtp-sink; ``-c`` prints a running count we read to know when all mail arrived."""

    def __init__(self, port: int, dump: Path | None = None) -> None:
        argv = [need("smtp-sink"), "-c", "-u", "nobody"]
        if dump:
            dump.mkdir(parents=True, exist_ok=True)
            os.chmod(dump, 0o777)  # smtp-sink writes as nobody
            argv += ["-d", f"{dump}/%M."]
        self.port, self.count = port, 0
        self.proc = subprocess.Popen([*argv, f"127.0.0.1:{port}", "1024"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        wait_port(port, self.proc)

    def _read(self) -> None:
        assert isinstance(self.proc.stdout, io.BufferedReader)  # Popen(stdout=PIPE): read1 returns what is there
        buf = b""
        while chunk := self.proc.stdout.read1(4096):
            buf = (buf + chunk)[-200:]
            found = re.findall(rb"mesg=(\d+)", buf)
            if found:
                self.count = int(found[-1])

    def wait_for(self, n: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while self.count < n and time.monotonic() < end:
            time.sleep(0.005)
        return self.count >= n

    def settle(self, quiet: float = 1.0, limit: float = 300) -> None:
        """Until no message has arrived for ``quiet`` seconds: a system that answers once it has
        queued (Postfix) is still delivering after its run, and would load the next run's machine."""
        end = time.monotonic() + limit
        while time.monotonic() < end:
            seen = self.count
            time.sleep(quiet)
            if self.count == seen:
                return

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


@dataclass
class Postfix:
    """A private Postfix instance (``postfix -c``) relaying everything to ``127.0.0.1:<sink>``."""

    work: Path
    name: str
    port: int
    sink_port: int
    altermime: bool = False
    reinject_port: int = field(default_factory=free_port)
    tls: TlsFiles | None = None  # STARTTLS offered to clients, and required (verified) to the sink
    discard: bool = False  # a sink: accept and discard (the STARTTLS phase's sink)

    @property
    def conf(self) -> Path:
        return self.work / self.name / "conf"

    def pids(self) -> list[int]:
        """The master and every process under it (smtpd, cleanup, qmgr, smtp, pipe → filter)."""
        pidfile = self.work / self.name / "queue" / "pid" / "master.pid"
        master = int(pidfile.read_text().split()[0])
        return [master, *descendants(master)]

    def start(self) -> None:
        base = self.work / self.name
        for d in ("conf", "queue", "data", "filter"):
            (base / d).mkdir(parents=True, exist_ok=True)
        shutil.chown(base / "data", "postfix")
        master = Path("/etc/postfix/master.cf").read_text()
        smtpd = f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
        extra = ""
        if self.altermime:
            os.chmod(base / "filter", 0o1777)
            script = self._filter_script(base)
            smtpd = f"127.0.0.1:{self.port} inet n - n - - smtpd -o content_filter=altermime:dummy\n"
            extra = (f"altermime unix - n n - 20 pipe flags=Rq user={FILTER_USER} null_sender= "
                     f"argv={script} ${{sender}} ${{recipient}}\n"
                     f"127.0.0.1:{self.reinject_port} inet n - n - - smtpd -o content_filter=\n")
        master = re.sub(r"(?m)^smtp\s+inet.*\n", smtpd, master) + extra
        (self.conf / "master.cf").write_text(master)
        (self.conf / "main.cf").write_text(f"""compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = {self.name}.bench.test
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{self.sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
maillog_file_prefixes = {self.work}
maillog_file = {base}/maillog
message_size_limit = 157286400
default_process_limit = 200
altermime_destination_concurrency_limit = 20
""" + self._tls_main())
        self._postfix("start")
        wait_port(self.port, None)  # postfix(1) daemonizes

    def _tls_main(self) -> str:
        out = ""
        if self.discard:
            out += "relayhost =\ndefault_transport = discard\nrelay_transport = discard\n"
        if self.tls:
            t = self.tls
            out += (f"smtpd_tls_cert_file = {t.cert}\nsmtpd_tls_key_file = {t.key}\nsmtpd_tls_security_level = may\n"
                    "smtpd_tls_session_cache_database = btree:${data_directory}/smtpd_scache\n")
            if not self.discard:  # to the sink: verified like the relay does (name, CA), client certificate
                out += (f"smtp_tls_CAfile = {t.ca}\nsmtp_tls_cert_file = {t.client_cert}\n"
                        f"smtp_tls_key_file = {t.client_key}\n"
                        # inline: map; a value with spaces is braced (postconf(5), "inline:")
                        f"smtp_tls_policy_maps = inline:{{ {{[127.0.0.1]:{self.sink_port} = secure "
                        f"match={t.sink_name}}} }}\n"
                        "smtp_tls_session_cache_database = btree:${data_directory}/smtp_scache\n")
        return out

    def discarded(self) -> int:
        """Messages this sink instance has discarded so far (from its log)."""
        log = self.work / self.name / "maillog"
        return log.read_text(errors="replace").count("status=sent (") if log.exists() else 0

    def _filter_script(self, base: Path) -> Path:
        txt, html = base / "footer.txt", base / "footer.html"
        txt.write_text(f"-- \n{FOOTER_MARK.decode()}: Alice Wilber, Contoso\n")
        html.write_text(f'<p class="{FOOTER_MARK.decode()}"><b>Alice Wilber</b> · Contoso</p>\n')
        script = base / "filter.sh"
        script.write_text(f"""#!/bin/sh
# FILTER.README's simple content filter, with alterMIME adding a footer to text and HTML parts.
cd {base}/filter || exit 75
f=in.$$
trap 'rm -f $f' 0 1 2 3 15
cat > $f || exit 75
/usr/bin/altermime --input=$f --disclaimer={txt} --disclaimer-html={html} >/dev/null 2>&1 || exit 75
exec {need("smtp-source")} -F $f -m 1 -s 1 -f "$1" -t "$2" 127.0.0.1:{self.reinject_port}
""")
        script.chmod(0o755)
        return script

    def _postfix(self, action: str) -> None:
        # postfix(1) reports to the terminal only; script(1) gives it one so errors show.
        r = subprocess.run(["script", "-qc", f"postfix -c {self.conf} {action}", "/dev/null"],
                           capture_output=True, text=True)
        if r.returncode and action == "start":
            raise RuntimeError(f"postfix {self.name}: {r.stdout.strip()}")

    def stop(self) -> None:
        self._postfix("stop")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path
    client_cert: Path
    client_key: Path
    sink_name: str = "mail.protection.outlook.com"  # what the relay's tenant endpoint must present


class Relay:
    def __init__(self, work: Path, port: int, sink_port: int, metrics_port: int, workers: int = 1,
                 tls: bool = False, certs_from: Path | None = None, second_tenant_sink: int | None = None) -> None:
        self.work, self.port, self.workers = work / f"relay-{workers}{'-tls' if tls else ''}", port, workers
        self.metrics_port = metrics_port
        self.work.mkdir(parents=True, exist_ok=True)
        rules = self.work / "rules"
        shutil.copytree(ROOT / "rules", rules, dirs_exist_ok=True)
        tenant = rules / "contoso" / "tenant.toml"
        tenant.write_text(re.sub(r'(?m)^endpoint = .*$', f'endpoint = "127.0.0.1:{sink_port}"', tenant.read_text()))
        signatures = ROOT / "signatures"
        if second_tenant_sink is not None:
            signatures = self._second_tenant(rules, second_tenant_sink)
        certs = self.work / "certs"
        conf = self.work / "bench.toml"
        conf.write_text(f"""# Benchmark profile: STARTTLS off on loopback on both sides, explicitly (issue #14).
[service]
hostname = "smtp.signature-relay.test"
service_domain = "signature-relay.test"
tenants_dir = "{rules}"
signatures_dir = "{signatures}"
var_dir = "{self.work / 'var'}"
[listen]
smtp = ["127.0.0.1:{port}"]
require_starttls = {"true" if tls else "false"}
[tls]
cert = "{certs}/server.crt"
key = "{certs}/server.key"
[binding]
sender_domain = true
[security]
allowed_networks = ["127.0.0.0/8"]
max_connections_per_ip = 1000
[delivery]
ca_bundle = "{certs}/ca.crt"
pool_size = 20
plaintext_loopback_benchmark = {"false" if tls else "true"}
[metrics]
listen = "127.0.0.1:{metrics_port}"
[certs]
dir = "{certs}"
[sink]
enabled = false
""")
        self.conf, self.certs = conf, certs
        if certs_from is not None:  # one PKI for every system of the STARTTLS phase
            shutil.copytree(certs_from, certs, dirs_exist_ok=True)
        subprocess.run([VENV_BIN / "signature-relay", "certs", "init", "-c", str(conf), "--missing-only"],
                       check=True, capture_output=True)
        self.log = (self.work / "relay.log").open("wb")
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([VENV_BIN / "signature-relay", "serve", "-c", str(self.conf), "--log-level",
                                 "warning", "--workers", str(self.workers)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, proc)
        if self.workers > 1:
            time.sleep(1.5)  # the supervisor's socket answers at once: let every worker start serving it
        return proc

    def pids(self) -> list[int]:
        return [self.proc.pid, *descendants(self.proc.pid)]

    def _second_tenant(self, rules: Path, sink_port: int) -> Path:
        """A copy of the sample tenant as "fabrikam" (its own id, domains and rules) delivering into
        its own sink; returns the signatures directory that has its templates too."""
        shutil.copytree(rules / "contoso", rules / "fabrikam")
        t = rules / "fabrikam" / "tenant.toml"
        text = t.read_text().replace("3f6e1b2a-9c4d-4e8f-a1b2-5c7d9e0f1a2b", "4a7f2c3b-0d5e-4f90-b2c3-6d8e0f1a2b3c")
        text = text.replace("contoso", "fabrikam").replace("fabrikam-7q4k2m", "fabrikam-2b9x1k")
        t.write_text(re.sub(r'(?m)^endpoint = .*$', f'endpoint = "127.0.0.1:{sink_port}"', text))
        for f in (rules / "fabrikam").iterdir():
            if f.name != "tenant.toml" and f.suffix in (".csv", ".toml"):
                f.write_text(f.read_text().replace("contoso", "fabrikam"))
        signatures = self.work / "signatures"
        shutil.copytree(ROOT / "signatures", signatures, dirs_exist_ok=True)
        shutil.copytree(signatures / "contoso", signatures / "fabrikam", dirs_exist_ok=True)
        return signatures

    def restart(self) -> None:
        """A fresh process (empty pools, peak RSS from zero)."""
        self.stop()
        self.proc = self._start()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- measurement ------------------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of the processes and their reaped children (/proc/<pid>/stat fields 14-17)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in f[11:15]) / tick
    return total


def machine_busy() -> float:
    """Seconds of CPU the whole machine spent busy (all processes), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak(pid: int) -> None:
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM (proc(5))


@dataclass
class Run:
    system: str
    message: str
    per_conn: int
    sessions: int
    n: int
    seconds: float
    cpu: float | None  # CPU seconds of the system under test (all its processes)
    machine_cpu: float
    complete: bool

    @property
    def rate(self) -> float:
        return self.n / self.seconds


def send(port: int, msg: Path, n: int, sessions: int, per_conn: int) -> subprocess.Popen[bytes]:
    argv = [need("smtp-source"), "-F", str(msg), "-m", str(n), "-s", str(sessions), "-f", SENDER, "-t", RCPT,
            "-M", "bench-client.test"]
    if per_conn > 1:
        argv.append("-d")  # many messages per connection, as Exchange Online sends
    return subprocess.Popen([*argv, f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def measure(system: str, port: int, sink: Sink, msg: Path, label: str, n: int, sessions: int, per_conn: int,  # noqa: PLR0913
            pids: Callable[[], list[int]] | None, timeout: float, *, until_sent: bool = False) -> Run:
    """One closed-loop run. It ends when the sink has all ``n`` messages, or (``until_sent``, for
    the relay alone: its 250 comes only after the sink's) when smtp-source has sent them all."""
    start_count = sink.count
    cpu_pids = pids() if pids else None
    cpu0 = cpu_seconds(cpu_pids) if cpu_pids else None
    busy0 = machine_busy()
    t0 = time.perf_counter()
    src = send(port, msg, n, sessions, per_conn)
    if until_sent:
        _, err = src.communicate(timeout=timeout)
        done = src.returncode == 0
        elapsed = time.perf_counter() - t0
    else:
        done = sink.wait_for(start_count + n, timeout)
        elapsed = time.perf_counter() - t0
        _, err = src.communicate(timeout=60)
    if src.returncode:
        print(f"  {system}: smtp-source: {err.decode(errors='replace').strip()[:300]}", flush=True)
    relay_cpu = (cpu_seconds(pids()) - cpu0) if pids and cpu0 is not None else None
    return Run(system, label, per_conn, sessions, n, elapsed, relay_cpu, machine_busy() - busy0, done)


BIG_ONE = 4  # 25 MB messages one after another for one message's rate


@dataclass(frozen=True)
class Timed:
    """A loadgen.py run timed by loadgen itself (its start-up and message preparation left out)."""

    n: int
    seconds: float
    first_ms: float
    cpu: float | None

    @property
    def rate(self) -> float:
        return self.n / self.seconds


def timed_loadgen(port: int, msg: Path, n: int, pids: Callable[[], list[int]] | None) -> Timed:
    """``n`` messages one after another on one session, one per connection, by loadgen.py."""
    cpu_pids = pids() if pids else None
    cpu0 = cpu_seconds(cpu_pids) if cpu_pids else None
    res = loadgen(port, msg, n, 1, 1)
    if res["failed"] or res["sent"] != n:
        raise RuntimeError(f"loadgen to port {port}: {res['sent']} of {n} sent, {res['errors']}")
    cpu = (cpu_seconds(pids()) - cpu0) if pids and cpu0 is not None else None
    return Timed(n, float(res["seconds"]), float(res["latencies"][0]), cpu)


def probe(port: int, raw: bytes, stop: threading.Event, out: list[float], sender: str = SENDER) -> None:
    """Small messages one after another while big ones are in flight: the latency other sessions see."""
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=120) as c:
                c.sendmail(sender, [RCPT], raw)
        except (OSError, smtplib.SMTPException) as e:
            print(f"  probe: {e}", flush=True)
            return
        out.append(time.perf_counter() - t0)


def greeting_probe(port: int, stop: threading.Event, out: list[float]) -> None:
    """Connect, wait for the greeting, quit, every 5 ms: how long the relay's event loop keeps a new
    session waiting while big messages are processed (its longest stall, seen from outside)."""
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
                c.recv(512)
                out.append(time.perf_counter() - t0)
                c.sendall(b"QUIT\r\n")
                c.recv(512)
        except OSError as e:
            print(f"  greeting probe: {e}", flush=True)
            return
        time.sleep(0.005)


def verify(work: Path, sink_port: int, ports: dict[str, int], raw: bytes) -> dict[str, str]:
    """Send a message through each system into a sink that keeps it; check the work was done
    (alterMIME's footer, the relay's signature and processed header, nothing added by the others)."""
    dump = work / "verify"
    sink = Sink(sink_port, dump)
    results: dict[str, str] = {}
    try:
        for system, port in ports.items():
            before = set(dump.iterdir())
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
                c.sendmail(SENDER, [RCPT], raw)
            if not sink.wait_for(len(before) + 1, 60):
                raise SystemExit(f"verify: the message sent through {system} never reached the sink")
            time.sleep(0.2)
            [new] = set(dump.iterdir()) - before
            got = new.read_bytes()
            checks = {
                "direct": SIG_MARK not in got and FOOTER_MARK not in got,
                "postfix": SIG_MARK not in got and FOOTER_MARK not in got,
                "altermime": FOOTER_MARK in got,
                "relay": SIG_MARK in got and b"X-CodeTwoProcessed: true" in got,
            }
            checks["relay ×2"] = checks["relay"]
            if not checks[system]:
                raise SystemExit(f"verify: {system}'s output does not show its work; see {new}")
            results[system] = {"direct": "untouched", "postfix": "untouched", "altermime": "footer added",
                               "relay": "signature stamped, X-CodeTwoProcessed: true",
                               "relay ×2": "the same, two workers"}[system]
    finally:
        sink.stop()
    return results


@contextlib.contextmanager
def environment(work: Path, sink_port: int) -> Iterator[dict[str, object]]:
    started: list[object] = []
    try:
        ports = {"direct": sink_port, "postfix": free_port(), "altermime": free_port(), "relay": free_port(),
                 "relay ×2": free_port()}
        pf = Postfix(work, "postfix", ports["postfix"], sink_port)
        pf.start()
        started.append(pf)
        am = Postfix(work, "altermime", ports["altermime"], sink_port, altermime=True)
        am.start()
        started.append(am)
        relay = Relay(work, ports["relay"], sink_port, free_port())
        started.append(relay)
        relay2 = Relay(work, ports["relay ×2"], sink_port, free_port(), workers=2)
        started.append(relay2)
        yield {"ports": ports, "postfix": pf, "altermime": am, "relay": relay, "relay ×2": relay2}
    finally:
        for s in reversed(started):
            with contextlib.suppress(Exception):
                s.stop()  # type: ignore[attr-defined]


def ensure_filter_user() -> None:
    if subprocess.run(["id", FILTER_USER], capture_output=True).returncode:
        subprocess.run(["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", FILTER_USER], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer messages (a smoke run; figures are noisier)")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent smtp-source sessions (default 20)")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("e2e benchmark: run as root (private Postfix instances need it)")
    # SIGTERM (timeout, Ctrl-C from a wrapper) unwinds like an exception: every Postfix instance
    # and relay started is stopped by the finally blocks, none left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for tool in ("postfix", "smtp-source", "smtp-sink", "altermime", "script"):
        need(tool)
    ensure_filter_user()
    work = Path(tempfile.mkdtemp(prefix="sr-bench-"))
    os.chmod(work, 0o755)
    msgs = {"10 KB reply": outlook_reply(), EXO: outlook_reply_from_exchange_online(),
            "200 KB HTML + inline images": html_with_images(), "25 MB attachment": with_attachment(25, html=True)}
    files = {}
    for i, (label, raw) in enumerate(msgs.items()):
        files[label] = work / f"m{i}.eml"
        # smtp-source -F sends each line of the file with CRLF: a CRLF file would arrive as CR CR LF.
        files[label].write_bytes(raw.replace(b"\r\n", b"\n"))
    try:
        return bench(work, files, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


SYSTEMS = ("direct", "postfix", "altermime", "relay", "relay ×2")
# The 10 KB reply with the header section Exchange Online hands a connector (tests/exo_mail.py):
# 58 fields, 12 KB, where the synthetic reply has 5.
EXO = "10 KB reply, Exchange Online's header (22 KB)"


def bench(work: Path, files: dict[str, Path], args: argparse.Namespace) -> int:
    sink_port = free_port()
    q = args.quick
    plan = [  # (message, messages per run, sessions, per-connection modes)
        ("10 KB reply", 600 if q else 3000, args.sessions, (1, 0)),
        (EXO, 600 if q else 3000, args.sessions, (1,)),
        ("200 KB HTML + inline images", 100 if q else 400, args.sessions, (1,)),
        ("25 MB attachment", 4 if q else 8, 4, (1,)),
    ]
    reps = 1 if q else 2
    runs: list[Run] = []
    extra: dict[str, str] = {}
    goals: list[str] = []  # the targets' lines that are not about msg/s (open loop, 25 MB)
    with environment(work, sink_port) as env:
        ports: dict[str, int] = env["ports"]  # type: ignore[assignment]
        relay: Relay = env["relay"]  # type: ignore[assignment]
        relay2: Relay = env["relay ×2"]  # type: ignore[assignment]
        pids: dict[str, Callable[[], list[int]] | None] = {
            "direct": None, "postfix": env["postfix"].pids, "altermime": env["altermime"].pids,  # type: ignore[attr-defined]
            "relay": relay.pids, "relay ×2": relay2.pids}
        print("verifying that every system does its work ...", flush=True)
        checked = verify(work, sink_port, ports, files["10 KB reply"].read_bytes())
        relay.restart()
        relay2.restart()
        time.sleep(3)  # Postfix's connection cache (2 s) lets go of the verification sink
        sink = Sink(sink_port)
        try:
            for label, n, sessions, modes in plan:
                for per_conn in modes:
                    for rep in range(reps):
                        for system in SYSTEMS:
                            if rep == 0:  # warm-up: processes started, pools and caches filled
                                measure(system, ports[system], sink, files[label], label, min(n, 40), sessions,
                                        per_conn or 2, None, 600)
                            r = measure(system, ports[system], sink, files[label], label, n, sessions,
                                        per_conn or 2, pids[system], 900)
                            r.per_conn = per_conn
                            runs.append(r)
                            print(f"  {label:28} {'1/conn' if per_conn else 'many/conn':9} {system:9} "
                                  f"{r.rate:8.1f} msg/s  {'' if r.complete else 'INCOMPLETE '}"
                                  f"cpu {1000 * (r.cpu or 0) / n:6.2f} ms/msg", flush=True)
            mix_note = mix_phase(work, ports, pids, sink, runs, args, relay)
            extra |= big_message_figures(relay, ports["relay"], sink, files, env["postfix"],  # type: ignore[arg-type]
                                         ports["postfix"], goals)
            latency = open_loop(ports, files["10 KB reply"], runs, q, pids, sink, goals)
        finally:
            sink.stop()
        tls_runs = tls_phase(work, files, relay.certs, args)
    said = re.findall(r"ready: .*, event loop (.+)", (relay.work / "relay.log").read_text(errors="replace"))
    write_report(args.out, runs, checked, extra, files, tls_runs, latency, said[-1] if said else "(not found)",
                 mix_note, goals)
    return 0 if all(r.complete for r in runs + tls_runs) else 1


LOADGEN = HERE / "loadgen.py"
MIX = "real-mail mix"


def copies_by_decision(metrics_port: int) -> dict[str, float]:
    """The relay's signature_relay_copies_total by decision (stamped, marked, pass-through:…)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'^signature_relay_copies_total\{[^}]*decision="([^"]+)"[^}]*\} ([0-9.e+]+)$', text, re.M):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def mix_phase(work: Path, ports: dict[str, int], pids: dict[str, Callable[[], list[int]] | None],
              sink: Sink, runs: list[Run], args: argparse.Namespace, relay: Relay) -> str:
    """Every system on real mail (real_mail_mix), sent in turn by loadgen.py, plaintext, one
    message per connection; a run ends when the sink has them all. Returns the report's note:
    the mix, and what the relay decided for its copies during its runs."""
    mixdir = work / "mix"
    used, left_out = real_mail_mix(mixdir)
    n = used * (1 if args.quick else 3)
    before = copies_by_decision(relay.metrics_port)
    for rep in range(1 if args.quick else 2):
        for system in SYSTEMS:
            if rep == 0:
                measure_lg(system, ports[system], mixdir, MIX, min(n, 100), args.sessions, 1, None,
                           lambda: sink.count, None)
            r = measure_lg(system, ports[system], mixdir, MIX, n, args.sessions, 1, pids[system],
                           lambda: sink.count, None)
            runs.append(r)
            print(f"  {MIX:28} {'1/conn':9} {system:9} {r.rate:8.1f} msg/s  {'' if r.complete else 'INCOMPLETE '}"
                  f"cpu {1000 * (r.cpu or 0) / n:6.2f} ms/msg", flush=True)
    after = copies_by_decision(relay.metrics_port)
    decided = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    total = sum(decided.values()) or 1
    said = ", ".join(f"{k} {v:.0f} ({100 * v / total:.0f} %)"
                     for k, v in sorted(decided.items(), key=lambda kv: -kv[1]) if v)
    return (f"The {MIX} row: the {used} messages of the public corpora in tests/data (the reply corpus; "
            f"mail-parser, flufl.bounce and CPython test messages; {left_out} left out that the relay refuses at "
            f"ingress), From: set to the benchmark sender and nothing else changed (e2e.real_mail_mix), sent in turn "
            f"by benchmarks/loadgen.py, plaintext, {args.sessions} sessions, one message per connection, "
            f"{n} per run. What the relay did with them: {said}.")


def loadgen(port: int, msg: Path, n: int, sessions: int, per_conn: int, *, rate: float = 0.0,  # noqa: PLR0913
            ca: Path | None = None, server_name: str = "smtp.signature-relay.test",
            timeout: float = 900) -> dict[str, Any]:
    argv = [sys.executable, str(LOADGEN), "--port", str(port), "--message", str(msg), "-n", str(n),
            "-s", str(sessions), "--per-conn", str(per_conn), "--rate", str(rate)]
    if ca is not None:
        argv += ["--tls", "--ca", str(ca), "--server-name", server_name]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"loadgen: {r.stderr[-500:]}")
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def measure_lg(system: str, port: int, msg: Path, label: str, n: int, sessions: int, per_conn: int,  # noqa: PLR0913
               pids: Callable[[], list[int]] | None, done: Callable[[], int] | None, ca: Path | None) -> Run:
    """A run driven by loadgen.py, STARTTLS verified against ``ca`` (plaintext without one; ``msg``
    may be a directory of messages sent in turn); ``done`` counts what reached the sink (Postfix
    systems queue first), else loadgen's own completion is the end (inline relay, direct sink)."""
    start = done() if done else 0
    cpu_pids = pids() if pids else None
    cpu0 = cpu_seconds(cpu_pids) if cpu_pids else None
    busy0 = machine_busy()
    t0 = time.perf_counter()
    # the sink presents the tenant endpoint's name; every other system the relay's own
    res = loadgen(port, msg, n, sessions, per_conn, ca=ca,
                  server_name="mail.protection.outlook.com" if system == "direct" else "smtp.signature-relay.test")
    complete = res["failed"] == 0
    if done:  # until the sink has them all, or nothing arrived for 60 s (then INCOMPLETE)
        last, seen = time.monotonic(), done()
        while seen < start + res["sent"] and time.monotonic() - last < 60:
            time.sleep(0.02)
            now = done()
            if now != seen:
                last, seen = time.monotonic(), now
        complete = complete and seen >= start + res["sent"]
    elapsed = time.perf_counter() - t0
    if res["failed"]:
        print(f"  {system}: {res['failed']} failed: {res['errors']}", flush=True)
    cpu = (cpu_seconds(pids()) - cpu0) if pids and cpu0 is not None else None
    return Run(system, label, per_conn, sessions, n, elapsed, cpu, machine_busy() - busy0, complete)


def tls_phase(work: Path, files: dict[str, Path], certs: Path, args: argparse.Namespace) -> list[Run]:
    """Every system with STARTTLS on both sides, driven by loadgen.py (smtp-source has no TLS),
    into a Postfix TLS sink that discards (measured alone first: the "direct" row). Postfix verifies
    the sink's name and CA and presents a client certificate, as the relay does."""
    print("STARTTLS on both sides ...", flush=True)
    tf = TlsFiles(certs / "server.crt", certs / "server.key", certs / "ca.crt", certs / "tenants" / "contoso.crt",
                  certs / "tenants" / "contoso.key")
    sink_tls = TlsFiles(certs / "sink.crt", certs / "sink.key", tf.ca, tf.client_cert, tf.client_key)
    ports = {s: free_port() for s in SYSTEMS}
    started: list[Any] = []
    runs: list[Run] = []
    try:
        sink = Postfix(work, "tls-sink", ports["direct"], 0, tls=sink_tls, discard=True)
        sink.start()
        started.append(sink)
        pf = Postfix(work, "postfix-tls", ports["postfix"], ports["direct"], tls=tf)
        am = Postfix(work, "altermime-tls", ports["altermime"], ports["direct"], altermime=True, tls=tf)
        for x in (pf, am):
            x.start()
            started.append(x)
        relays = {s: Relay(work, ports[s], ports["direct"], free_port(), workers=w, tls=True, certs_from=certs)
                  for s, w in (("relay", 1), ("relay ×2", 2))}
        started += relays.values()
        pids: dict[str, Callable[[], list[int]] | None] = {"direct": sink.pids, "postfix": pf.pids,
                                                          "altermime": am.pids}
        pids |= {s: r.pids for s, r in relays.items()}
        done: dict[str, Callable[[], int] | None] = {"direct": None, "postfix": sink.discarded,
                                                    "altermime": sink.discarded, "relay": None, "relay ×2": None}
        q = args.quick
        plan = [("10 KB reply", 300 if q else 1500, (1, 10)), ("200 KB HTML + inline images", 60 if q else 300, (1,))]
        for label, n, modes in plan:
            for per_conn in modes:
                for rep in range(1 if q else 2):
                    for system in SYSTEMS:
                        if rep == 0:
                            measure_lg(system, ports[system], files[label], label, min(n, 40), args.sessions,
                                       per_conn, None, done[system], tf.ca)
                        r = measure_lg(system, ports[system], files[label], label, n, args.sessions, per_conn,
                                       pids[system], done[system], tf.ca)
                        r.per_conn = 1 if per_conn == 1 else 0
                        runs.append(r)
                        print(f"  TLS {label:24} {'1/conn' if per_conn == 1 else 'many/conn':9} {system:9} "
                              f"{r.rate:8.1f} msg/s  {'' if r.complete else 'INCOMPLETE '}"
                              f"cpu {1000 * (r.cpu or 0) / n:6.2f} ms/msg", flush=True)
    finally:
        for x in reversed(started):
            with contextlib.suppress(Exception):
                x.stop()
    return runs


def open_loop(ports: dict[str, int], msg: Path, runs: list[Run], quick: bool,
              pids: dict[str, Callable[[], list[int]] | None], sink: Sink, goals: list[str]) -> list[str]:
    """Latency at 50 % and 80 % of each system's closed-loop maximum (10 KB, one per connection,
    plaintext), open loop, and what it adds over the direct sink at the same rate; with the
    system's CPU per message during the run (a fixed rate costs more per message than flat out).
    Every run starts once the sink has had nothing for a second: Postfix answers once it has
    queued, so its 80 % run (and the 4 × 25 MB before) goes on delivering after the load
    generator is done; without the wait, that load shared the two cores with the next runs (the
    relay's 50 % one, and the direct sink's baselines). The p99 target's line goes to ``goals``."""
    out: list[str] = []
    seen: dict[tuple[str, float], tuple[float, float, float, float]] = {}  # p50, p99, added p50, added p99
    best = {r.system: r.rate for r in runs if r.message == "10 KB reply" and r.per_conn == 1}
    for system in ("postfix", "relay", "relay ×2"):
        for share in (0.5, 0.8):
            rate = best[system] * share
            n = int(min(rate * (4 if quick else 10), 6000))
            of = pids[system]
            sink.settle()
            cpu0 = cpu_seconds(of()) if of else 0.0
            machine0 = machine_busy()
            t0 = time.perf_counter()
            got = loadgen(ports[system], msg, n, 0, 1, rate=rate)
            took = time.perf_counter() - t0
            # The whole machine too: the open loop's load generator is Python (smtp-source, which set
            # the maximum, is C), so "50 % of the maximum" can fill both cores by itself.
            busy = f"; the machine {(machine_busy() - machine0) / took / (os.cpu_count() or 1):.0%} busy"
            if of:
                cpu = cpu_seconds(of()) - cpu0
                busy = (f"; {system}'s CPU {1000 * cpu / n:.2f} ms per message "
                        f"({cpu / took:.0%} of one core){busy}")
            sink.settle()
            base = loadgen(ports["direct"], msg, n, 0, 1, rate=rate)
            lat, blat = sorted(got["latencies"]), sorted(base["latencies"])
            if not lat or not blat:
                out.append(f"{system} at {share:.0%}: no answers ({got['errors']})")
                continue

            def pct(xs: list[float], p: float) -> float:
                return xs[min(len(xs) - 1, int(len(xs) * p))]

            late = sorted(got["late"] + base["late"]) or [float("nan")]
            out.append(f"{system} at {share:.0%} of its maximum ({rate:.0f} msg/s, {len(lat)} messages): p50 "
                       f"{pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms; added over the direct sink at the "
                       f"same rate: p50 {pct(lat, 0.5) - pct(blat, 0.5):+.1f} ms, p99 "
                       f"{pct(lat, 0.99) - pct(blat, 0.99):+.1f} ms{busy}; the load generator started messages "
                       f"{pct(late, 0.99):.1f} ms late at p99, {late[-1]:.1f} ms at most (both runs)"
                       f"{'' if got['failed'] == 0 else ' (failures)'}")
            print("  " + out[-1], flush=True)
            seen[system, share] = (pct(lat, 0.5), pct(lat, 0.99), pct(lat, 0.5) - pct(blat, 0.5),
                                   pct(lat, 0.99) - pct(blat, 0.99))
    if all((s, 0.5) in seen for s in ("relay", "relay ×2", "postfix")):
        goals.append(f"p99 added ≤ 10 ms at 50 % of the maximum load, 10 KB, 1 worker / 2 workers: "
                     f"{seen['relay', 0.5][3]:+.1f} ms / {seen['relay ×2', 0.5][3]:+.1f} ms "
                     f"(Postfix's at 50 % of its own maximum: {seen['postfix', 0.5][3]:+.1f} ms)")
    for system in ("relay", "relay ×2"):
        for share in (0.5, 0.8):
            if (system, share) in seen and ("postfix", share) in seen:
                (r50, r99, ra50, ra99), (p50, p99, pa50, pa99) = seen[system, share], seen["postfix", share]
                times = best[system] / best["postfix"]
                out.append(f"{system} ÷ postfix, each at {share:.0%} of its own maximum ({times:.2f} × the rate): "
                           f"p50 {r50 / p50:.2f} ×, p99 {r99 / p99:.2f} ×; added p99 {ra99:+.1f} ms "
                           f"against {pa99:+.1f} ms, added p50 {ra50:+.1f} ms against {pa50:+.1f} ms")
    return out


def big_message_figures(relay: Relay, port: int, sink: Sink, files: dict[str, Path],
                        pf: Postfix, pf_port: int, goals: list[str]) -> dict[str, str]:
    """Peak RSS while four 25 MB messages are relayed at once, and what a small message sees meanwhile;
    the same for Postfix, the baseline. The 25 MB targets' lines go to ``goals``."""
    size = files["25 MB attachment"].stat().st_size
    small = files["10 KB reply"].read_bytes()
    out: dict[str, str] = {}
    four: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # MB/s, peak RSS, small p99, longest greeting
    one: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # MB/s, peak RSS ratio, longest greeting, direct MB/s
    for parallel in (1, 4):
        relay.restart()
        latencies: list[float] = []
        greetings: list[float] = []
        stop = threading.Event()
        threads = [threading.Thread(target=probe, args=(port, small, stop, latencies), daemon=True),
                   threading.Thread(target=greeting_probe, args=(port, stop, greetings), daemon=True)]
        base_rss = peak_rss(relay.proc.pid)
        for t in threads:
            t.start()
        if parallel == 1:
            # One message's rate: loadgen.py times its own run, from its first connection to the
            # last 250, so the sender's start-up is not in it (smtp-source reads and converts the
            # 25 MB file before it connects: 0.1-0.2 s from its start to its connection here).
            lg = timed_loadgen(port, files["25 MB attachment"], BIG_ONE, relay.pids)
        r = measure("relay", port, sink, files["25 MB attachment"], "25 MB attachment", parallel * 2 if parallel > 1
                    else BIG_ONE, parallel, 1, relay.pids, 900, until_sent=True)
        stop.set()
        for t in threads:
            t.join(130)
        peak = peak_rss(relay.proc.pid)
        lat = sorted(latencies) or [float("nan")]
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        seen = (f"peak RSS {peak / 1e6:.0f} MB (start {base_rss / 1e6:.0f} MB) = "
                f"{peak / (parallel * size):.2f} × the {parallel} message(s) in flight; small messages meanwhile: "
                f"{len(latencies)} sent, p50 {1000 * statistics.median(lat):.0f} ms, p99 {1000 * p99:.0f} ms, "
                f"max {1000 * lat[-1]:.0f} ms; longest wait for a greeting (event-loop stall) "
                f"{1000 * max(greetings, default=float('nan')):.0f} ms over {len(greetings)} connections")
        if parallel == 4:
            four = (r.rate * size / 1e6, peak / (parallel * size), p99, max(greetings, default=float("nan")))
            out["4 × 25 MB"] = (f"{r.rate * size / 1e6:.1f} MB/s; {seen}; CPU {1000 * (r.cpu or 0) / r.n:.0f} ms "
                                "per message")
        else:
            # The baselines for one message's MB/s: the same message straight into the same sink, one
            # session, no probes, sent the same ways and as many times.
            dl = timed_loadgen(sink.port, files["25 MB attachment"], BIG_ONE, None)
            d = measure("direct", sink.port, sink, files["25 MB attachment"], "25 MB attachment", BIG_ONE, 1, 1, None,
                        900)
            one = (lg.rate * size / 1e6, peak / size, max(greetings, default=float("nan")), dl.rate * size / 1e6)
            out["1 × 25 MB"] = (
                f"{lg.rate * size / 1e6:.1f} MB/s ({BIG_ONE} messages one after another from loadgen.py, timed by "
                f"loadgen itself from its first connection to the last 250: {1000 / lg.rate:.0f} ms per message, "
                f"the first one after the restart {lg.first_ms:.0f} ms; CPU {1000 * (lg.cpu or 0) / lg.n:.0f} ms "
                f"per message); the same message straight into that smtp-sink the same way, no probes: "
                f"{dl.rate * size / 1e6:.1f} MB/s (the relay {lg.rate / dl.rate:.2f} × that); then {BIG_ONE} from "
                f"smtp-source, whose start-up counts (it reads and converts the file before it connects): "
                f"{r.rate * size / 1e6:.1f} MB/s, straight into the sink {d.rate * size / 1e6:.1f} MB/s "
                f"({r.rate / d.rate:.2f} ×); {seen}")
        print(f"  {parallel} × 25 MB: {out[f'{parallel} × 25 MB']}", flush=True)
        if parallel == 4:
            # Where a small message's wait comes from: the same probe straight to the sink while the
            # relay delivers the same four messages into it (the sink is single-threaded).
            direct: list[float] = []
            stop = threading.Event()
            t = threading.Thread(target=probe, args=(sink.port, small, stop, direct), daemon=True)
            t.start()
            measure("relay", port, sink, files["25 MB attachment"], "25 MB attachment", parallel * 2, parallel, 1,
                    None, 900, until_sent=True)
            stop.set()
            t.join(130)
            ds = sorted(direct) or [float("nan")]  # not "d": that name holds the 1 × 25 MB direct Run above
            out[f"{parallel} × 25 MB"] += (
                f"; the same small messages straight to the sink during the same load: {len(direct)} sent, p50 "
                f"{1000 * statistics.median(ds):.0f} ms, p99 {1000 * ds[min(len(ds) - 1, int(len(ds) * 0.99))]:.0f} ms")
            print(f"  small messages straight to the sink meanwhile: {len(direct)} sent, p99 "
                  f"{1000 * ds[min(len(ds) - 1, int(len(ds) * 0.99))]:.0f} ms", flush=True)
    out["4 × 25 MB through Postfix (the baseline)"] = big_messages_through_postfix(pf, pf_port, sink, files, four)
    print(f"  4 × 25 MB through Postfix: {out['4 × 25 MB through Postfix (the baseline)']}", flush=True)
    out["4 × 25 MB, own sink"], own_p99 = small_latency_own_sink(relay.work.parent, sink, files)
    print(f"  4 × 25 MB, small messages into their own sink: {out['4 × 25 MB, own sink']}", flush=True)
    out["4 × 25 MB, Postfix sink"] = small_latency_into_postfix(relay.work.parent, sink, files)
    print(f"  4 × 25 MB into a Postfix sink: {out['4 × 25 MB, Postfix sink']}", flush=True)
    goals += [
        f"the 25 MB-attachment message relayed and stamped at ≥ 100 MB/s: {one[0]:.1f} MB/s with the probes, "
        f"loadgen.py's own time (the same message straight into the sink, no probes: {one[3]:.1f} MB/s)",
        f"peak RSS ≤ 3 × the message size: {one[1]:.2f} × (one message), {four[1]:.2f} × their total (four at once)",
        f"no event-loop stall over 100 ms while they are processed (the longest wait for a greeting): "
        f"{1000 * one[2]:.0f} ms (one), {1000 * four[3]:.0f} ms (four at once)",
        f"small messages' p99 under 100 ms beside four 25 MB ones: {1000 * own_p99:.0f} ms into their own sink "
        f"({1000 * four[2]:.0f} ms sharing the big ones' smtp-sink, which reads one DATA at a time)"]
    return out


def big_messages_through_postfix(pf: Postfix, port: int, sink: Sink, files: dict[str, Path],
                                 relay: tuple[float, float, float, float]) -> str:
    """The 4 × 25 MB figures of the relay for Postfix's plain relay, the same load and probes, and the
    relay's as ratios to them. Postfix answers 250 once a message is in its queue, so its rate here is
    the rate it accepted them at (it delivers them afterwards). Its memory: Postfix is many processes
    (an smtpd per connection, cleanup, qmgr, smtp), each with the same libraries mapped, so their peak
    RSS would count those once per process; the figure is the highest sum of their PSS (shared pages
    split between the processes sharing them), sampled every 0.2 s."""
    size = files["25 MB attachment"].stat().st_size
    small = files["10 KB reply"].read_bytes()
    latencies: list[float] = []
    greetings: list[float] = []
    pss: list[int] = [0]
    stop = threading.Event()
    threads = [threading.Thread(target=probe, args=(port, small, stop, latencies), daemon=True),
               threading.Thread(target=greeting_probe, args=(port, stop, greetings), daemon=True),
               threading.Thread(target=pss_sampler, args=(pf.pids, stop, pss), daemon=True)]
    before = sink.count
    for t in threads:
        t.start()
    r = measure("postfix", port, sink, files["25 MB attachment"], "25 MB attachment", 8, 4, 1, pf.pids, 900,
                until_sent=True)
    stop.set()
    for t in threads:
        t.join(130)
    peak = pss[0]
    # Everything Postfix queued reaches the sink before the next phase begins.
    drained = sink.wait_for(before + 8 + len(latencies), 300)
    lat = sorted(latencies) or [float("nan")]
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    stall = max(greetings, default=float("nan"))
    mbs, rss_ratio, relay_p99, relay_stall = relay

    def ratio(a: float, b: float) -> float:  # a figure that could not be measured is no crash at the end of a run
        return a / b if b else float("nan")

    return (f"accepted at {r.rate * size / 1e6:.1f} MB/s; peak memory (summed PSS of its processes) "
            f"{peak / 1e6:.0f} MB = {peak / (4 * size):.2f} × the 4 messages; small messages meanwhile: "
            f"{_summary(latencies)}; longest "
            f"wait for a greeting {1000 * stall:.0f} ms over {len(greetings)} connections; CPU "
            f"{1000 * (r.cpu or 0) / r.n:.0f} ms per message (until accepted){'' if drained else ' (NOT DRAINED)'}. "
            f"The relay's 4 × 25 MB figures as ratios to these: MB/s {ratio(mbs, r.rate * size / 1e6):.2f} × (the "
            f"relay's 250 comes after the tenant's), peak memory per message in flight (its one process's peak "
            f"RSS) {ratio(rss_ratio, peak / (4 * size)):.2f} ×, small messages' p99 {ratio(relay_p99, p99):.2f} × "
            f"(the relay answers a small message once the sink has taken it, and the sink reads one 25 MB DATA "
            f"at a time; Postfix answers once it has queued it), longest greeting wait "
            f"{ratio(relay_stall, stall):.2f} ×")


def pss_sampler(pids: Callable[[], list[int]], stop: threading.Event, peak: list[int]) -> None:
    """The highest sum of the processes' PSS (proportional set size, /proc/<pid>/smaps_rollup) until
    ``stop``, in ``peak[0]``, sampled every 0.2 s."""
    while not stop.wait(0.2):
        total = 0
        for pid in pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        peak[0] = max(peak[0], total)


def _summary(xs: list[float]) -> str:
    lat = sorted(xs) or [float("nan")]
    return (f"{len(xs)} sent, p50 {1000 * statistics.median(lat):.0f} ms, p99 "
            f"{1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))]:.0f} ms, max {1000 * lat[-1]:.0f} ms")


def small_latency_own_sink(work: Path, sink: Sink, files: dict[str, Path]) -> tuple[str, float]:
    """The same 4 × 25 MB load, the small-message probe sent for a second tenant whose endpoint is
    a second smtp-sink: what the relay itself makes a small message wait, with the sink's own
    one-connection-at-a-time reading of a 25 MB DATA out of the small messages' way. The line,
    and the small messages' p99 in seconds."""
    sink2 = Sink(free_port())
    relay = Relay(work / "own-sink", free_port(), sink.port, free_port(), second_tenant_sink=sink2.port)
    try:
        small = files["10 KB reply"].read_bytes().replace(SENDER.encode(), b"alice@fabrikam.com")
        lat: list[float] = []
        stop = threading.Event()
        t = threading.Thread(target=probe, args=(relay.port, small, stop, lat, "alice@fabrikam.com"), daemon=True)
        t.start()
        r = measure("relay", relay.port, sink, files["25 MB attachment"], "25 MB attachment", 8, 4, 1, relay.pids,
                    900, until_sent=True)
        stop.set()
        t.join(130)
        if not sink2.wait_for(len(lat), 30):  # each was answered 250 only after that sink's 250
            raise SystemExit(f"the second tenant's sink got {sink2.count} of {len(lat)} small messages")
        ls = sorted(lat) or [float("nan")]
        return (f"the small messages for a second tenant whose endpoint is its own smtp-sink (the big ones' "
                f"sink reads one 25 MB DATA at a time and answers nothing else meanwhile): "
                f"{r.rate * files['25 MB attachment'].stat().st_size / 1e6:.1f} MB/s; small messages through "
                f"the relay meanwhile: {_summary(lat)}"), ls[min(len(ls) - 1, int(len(ls) * 0.99))]
    finally:
        relay.stop()
        sink2.stop()


def small_latency_into_postfix(work: Path, sink: Sink, files: dict[str, Path]) -> str:
    """The same 4 × 25 MB load and small-message probe, the relay delivering into a Postfix that
    discards: smtp-sink is one process, and under four 25 MB streams it keeps a small message
    waiting up to half a second itself; Postfix gives each connection its own smtpd."""
    pf = Postfix(work, "big-sink", free_port(), 0, discard=True)
    pf.start()
    relay = Relay(work / "big", free_port(), pf.port, free_port())
    try:
        small = files["10 KB reply"].read_bytes()
        via: list[float] = []
        direct: list[float] = []
        stop = threading.Event()
        threads = [threading.Thread(target=probe, args=(relay.port, small, stop, via), daemon=True),
                   threading.Thread(target=probe, args=(pf.port, small, stop, direct), daemon=True)]
        for t in threads:
            t.start()
        r = measure("relay", relay.port, sink, files["25 MB attachment"], "25 MB attachment", 8, 4, 1, relay.pids,
                    900, until_sent=True)
        stop.set()
        for t in threads:
            t.join(130)

        return (f"delivering into a private Postfix that discards (an smtpd per connection) instead of smtp-sink: "
                f"{r.rate * files['25 MB attachment'].stat().st_size / 1e6:.1f} MB/s; small messages through the "
                f"relay meanwhile: {_summary(via)}; straight to that Postfix meanwhile (it writes and fsyncs every "
                f"message, the 25 MB ones too): {_summary(direct)}")
    finally:
        relay.stop()
        pf.stop()


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    import aiosmtpd
    import aiosmtplib

    return {
        "python": platform.python_version(),
        "postfix": first_line(["postconf", "-d", "mail_version"]),
        "altermime": first_line(["dpkg-query", "-W", "-f", "${Version}", "altermime"]),
        "aiosmtpd": aiosmtpd.__version__,
        "aiosmtplib": aiosmtplib.__version__,
        "kernel": platform.release(),
        "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), "?"),
        "cores": str(os.cpu_count()),
    }


def best(runs: list[Run], system: str, label: str, per_conn: int) -> Run | None:
    rs = [r for r in runs if (r.system, r.message, r.per_conn) == (system, label, per_conn)]
    return max(rs, key=lambda r: r.rate) if rs else None  # the least disturbed repetition, as run.py does


def table(runs: list[Run], labels: list[str]) -> list[str]:
    lines = [
        "| message | connection | direct sink | Postfix relay | Postfix + alterMIME | signature-relay | "
        "signature-relay, 2 workers | relay ÷ alterMIME | relay ÷ Postfix | 2 workers ÷ alterMIME | "
        "2 workers ÷ Postfix |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        for per_conn in (1, 0):
            rs = {s: best(runs, s, label, per_conn) for s in SYSTEMS}
            if not all(rs.values()):
                continue
            rate = {s: r.rate for s, r in rs.items() if r}
            cell = {s: f"{rate[s]:.1f} msg/s" + (f" ({1000 * r.cpu / r.n:.2f} ms CPU)" if r and r.cpu else "")
                    + ("" if r and r.complete else " INCOMPLETE") for s, r in rs.items()}
            lines.append(f"| {label} | {'one message' if per_conn else 'many messages'} | " +
                         " | ".join(cell[s] for s in SYSTEMS) +
                         f" | {rate['relay'] / rate['altermime']:.2f} | {rate['relay'] / rate['postfix']:.2f}"
                         f" | {rate['relay ×2'] / rate['altermime']:.2f} | {rate['relay ×2'] / rate['postfix']:.2f} |")
    return lines


def cpu_table(runs: list[Run], labels: list[str]) -> list[str]:
    """CPU per message of each signature-relay configuration as a ratio to each baseline's, row by
    row of :func:`table` (the same runs): below 1, the relay spent less CPU on a message."""
    lines = [
        "| message | connection | relay ÷ Postfix | relay ÷ Postfix + alterMIME | 2 workers ÷ Postfix | "
        "2 workers ÷ Postfix + alterMIME |",
        "|---|---|---|---|---|---|",
    ]
    for label in labels:
        for per_conn in (1, 0):
            rs = {s: best(runs, s, label, per_conn) for s in ("postfix", "altermime", "relay", "relay ×2")}
            cpu = {s: r.cpu / r.n for s, r in rs.items() if r and r.cpu}
            if len(cpu) < len(rs):
                continue
            lines.append(f"| {label} | {'one message' if per_conn else 'many messages'} | "
                         f"{cpu['relay'] / cpu['postfix']:.2f} | {cpu['relay'] / cpu['altermime']:.2f} | "
                         f"{cpu['relay ×2'] / cpu['postfix']:.2f} | {cpu['relay ×2'] / cpu['altermime']:.2f} |")
    return lines


def targets(runs: list[Run], what: str, more: Sequence[str] = ()) -> list[str]:
    """The targets of issue #14 for one phase: the msg/s and CPU ones from ``runs``; ``more``, the
    lines the open loop and the 25 MB runs wrote (plaintext only)."""
    ten = {s: best(runs, s, "10 KB reply", 1) for s in SYSTEMS}
    r, r2, a, p = ten["relay"], ten["relay ×2"], ten["altermime"], ten["postfix"]
    if not (r and r2 and a and p):
        return []
    return ["", f"Targets (issue #14), {what}, 10 KB reply, one message per connection (1 worker / 2 workers):", "",
            f"- ≥ 10 × Postfix + alterMIME: {r.rate / a.rate:.2f} × / {r2.rate / a.rate:.2f} ×",
            f"- ≥ 1.5 × Postfix plain relay: {r.rate / p.rate:.2f} × / {r2.rate / p.rate:.2f} ×",
            f"- relay CPU ≤ 1.5 ms per message: {1000 * (r.cpu or 0) / r.n:.2f} ms / "
            f"{1000 * (r2.cpu or 0) / r2.n:.2f} ms",
            *(["", f"Targets (issue #14), {what}, latency and big messages (1 worker unless it says):", ""]
              + [f"- {m}" for m in more] if more else [])]


def write_report(path: Path, runs: list[Run], checked: dict[str, str], extra: dict[str, str],  # noqa: PLR0913
                 files: dict[str, Path], tls_runs: list[Run], latency: list[str], event_loop: str,
                 mix_note: str = "", goals: Sequence[str] = ()) -> None:
    v = versions()
    lines = [
        "# signature-relay end-to-end benchmark",
        "",
        f"Generated by `benchmarks/e2e.py` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. "
        f"Machine: {v['cpu']}, {v['cores']} cores, Linux {v['kernel']}. Python {v['python']}, "
        f"Postfix {v['postfix']}, alterMIME {v['altermime']}, aiosmtpd {v['aiosmtpd']}, aiosmtplib {v['aiosmtplib']}; "
        f"signature-relay on its default event loop ([service] event_loop = \"auto\"), which its start-up line "
        f"named: {event_loop}.",
        "",
        "## Plaintext on both sides",
        "",
        "Closed loop: Postfix's `smtp-source` with the given sessions sends the message to each system, which "
        "delivers to Postfix's `smtp-sink`; a run ends when the sink has them all. Plaintext on loopback on both "
        "sides for every system (the relay in its explicitly named benchmark profile). Every system ran in the "
        "same run, interleaved; the figure is the best repetition (the least disturbed). CPU is the system "
        "under test's own processes (Postfix: master and every process under it, alterMIME and the "
        "re-injection included).",
        "",
        "Baselines checked before timing: " + "; ".join(f"{k}: {v_}" for k, v_ in checked.items()) + ".",
        "",
        *table(runs, [*files, MIX]),
        "",
        "CPU per message as a ratio to the baselines' (the runs of the table above; below 1, less CPU):",
        "",
        *cpu_table(runs, [*files, MIX]),
    ]
    if EXO in files:
        lines += ["", f"The \"{EXO}\" row: the 10 KB reply with the header section Exchange Online hands an "
                  "outbound connector (tests/exo_mail.py: 58 fields, 12 KB: internal Received hops, ARC and DKIM, "
                  "the antispam fields, the cross-tenant and cross-premises fields), where the first row's has 5; "
                  "the relay binds it by its X-MS-Exchange-CrossTenant-Id."]
    if mix_note:
        lines += ["", mix_note]
    if extra:
        lines += ["", "Large messages through signature-relay (fresh process each, with its default cut-through: a "
                  "message goes to the sink while it arrives once 256 KiB are in, the final dot only once the whole "
                  "message checked out; meanwhile one probe sends 10 KB messages one after another, another opens a "
                  "connection every 5 ms and times the greeting):", ""]
        lines += [f"- {k}: {v_}" for k, v_ in extra.items()]
    if latency:
        lines += ["", "Open loop (benchmarks/loadgen.py at a fixed rate, one message per connection, 10 KB, "
                  "plaintext): latency from connect to the final reply, and what the system adds over the "
                  "direct sink at the same rate. Each run starts once the sink has had no message for a second "
                  "(Postfix delivers its queue after its own run); the generator makes each message's task at its "
                  "start time and says how late it started them:", ""]
        lines += [f"- {x}" for x in latency]
    lines += targets(runs, "plaintext", goals)
    if tls_runs:
        lines += ["", "## STARTTLS on both sides", "",
                  "benchmarks/loadgen.py (Python on uvloop, STARTTLS verified against the dev CA; smtp-source has "
                  "no TLS) sends to each system, which delivers over STARTTLS to a Postfix sink that discards (its own "
                  "row, \"direct sink\", is the sink measured alone). Postfix verifies the sink's name and CA and "
                  "presents a client certificate, as the relay does. The load generator runs on the same 2 cores "
                  "for every system.", "", *table(tls_runs, [x for x in files if "25 MB" not in x]), "",
                  "CPU per message as a ratio to the baselines' (below 1, less CPU):", "",
                  *cpu_table(tls_runs, [x for x in files if "25 MB" not in x]),
                  *targets(tls_runs, "STARTTLS")]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
