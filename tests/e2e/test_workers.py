"""``serve --workers N`` (issues #14, #15): several relay processes on one port, supervised.

Real processes, real swaks over STARTTLS, a real ``kill -9``: the surviving worker keeps serving
while the supervisor starts a replacement; SIGHUP reaches every worker; one /metrics endpoint
shows each worker; SIGTERM drains and ends them all.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.test_swaks_loop import swaks
from tests.support import free_port, make_deployment, wait_port

pytestmark = pytest.mark.e2e


def workers(pid: int) -> dict[int, int]:
    """worker index → pid, from the supervisor's children's command lines."""
    out: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == pid and b"--worker-index" in cmd:
            out[int(cmd[cmd.index(b"--worker-index") + 1])] = int(d.name)
    return out


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def until(cond: object, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        # The port answers as soon as the supervisor has bound it (the workers serve the
        # supervisor's sockets), before its metrics endpoint is up: not yet, rather than an error.
        with contextlib.suppress(OSError):
            if cond():  # type: ignore[operator]
                return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s")


def test_killed_worker_is_replaced_while_the_other_serves(tmp_path: Path, pki_dir: Path) -> None:
    mport = free_port()
    dep = make_deployment(tmp_path, pki_from=pki_dir, extra=f'[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    ca = str(dep.root / "certs" / "ca.crt")
    sink = subprocess.Popen([sys.executable, "-m", "relay", "sink", "-c", str(dep.config_path)], cwd=dep.root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sup = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--workers", "2", "--no-sink",
                            "-c", str(dep.config_path)], cwd=dep.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port(dep.sink_port, sink)
        wait_port(dep.relay_port, sup)
        until(lambda: len(workers(sup.pid)) == 2 and "signature_relay_workers 2.0" in metrics(mport))
        send = ("--tls", "--tls-verify", "--tls-ca-path", ca, "--from", "alice@contoso.com", "--to", "bob@example.net")
        for _ in range(4):
            rc, out = swaks(dep, *send)
            assert rc == 0, out
        text = metrics(mport)
        served = {int(w) for w in re.findall(r'signature_relay_messages_total\{result="accepted",tenant="contoso",'
                                             r'worker="(\d)"\}', text)}
        assert served and served <= {0, 1}
        # kill -9 one worker: the other keeps serving, and a new one takes its place
        before = workers(sup.pid)
        os.kill(before[1], signal.SIGKILL)
        rc, out = swaks(dep, *send)
        assert rc == 0, out
        until(lambda: workers(sup.pid).get(1) not in (None, before[1]))
        assert workers(sup.pid)[0] == before[0]
        until(lambda: 'signature_relay_worker_restarts_total{worker="1"} 1.0' in metrics(mport)
              and "signature_relay_workers 2.0" in metrics(mport))
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/healthz", timeout=5) as r:
            assert r.status == 200
        assert len(dep.delivered()) == 5
        # SIGHUP reaches both workers (each logs its reload); SIGTERM ends everything
        sup.send_signal(signal.SIGHUP)
        time.sleep(2)
        sup.send_signal(signal.SIGTERM)
        _, err = sup.communicate(timeout=60)
        log = err.decode()
        assert sup.returncode == 0
        assert "worker 1 (pid" in log and "exited with signal SIGKILL" in log
        assert log.count("signature-relay: configuration reloaded") == 2, log  # once per worker
        assert workers(sup.pid) == {}
    finally:
        for p in (sup, sink):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_workers_share_the_supervisors_socket_and_no_connection_is_refused_between_workers(
        tmp_path: Path, pki_dir: Path) -> None:
    """The supervisor binds the port once and every worker serves that socket: an idle worker
    takes the next connection (SO_REUSEPORT hashed connections to a worker, busy or not), and a
    connection made while every worker is dead waits in the socket's queue until a replacement
    accepts it, instead of being refused."""
    dep = make_deployment(tmp_path, pki_from=pki_dir)
    ca = str(dep.root / "certs" / "ca.crt")
    sink = subprocess.Popen([sys.executable, "-m", "relay", "sink", "-c", str(dep.config_path)], cwd=dep.root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sup = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--workers", "2", "--no-sink",
                            "-c", str(dep.config_path)], cwd=dep.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    send = ("--tls", "--tls-verify", "--tls-ca-path", ca, "--from", "alice@contoso.com", "--to", "bob@example.net")
    try:
        wait_port(dep.sink_port, sink)
        wait_port(dep.relay_port, sup)
        until(lambda: len(workers(sup.pid)) == 2)
        rc, out = swaks(dep, *send)
        assert rc == 0, out

        def listening(pid: int) -> set[str]:
            """The socket inodes ``pid`` has open (its listening socket among them). A descriptor may
            close between the listing and its readlink (a worker ending a connection): skipped."""
            fd_dir = Path(f"/proc/{pid}/fd")
            found = set()
            for f in os.listdir(fd_dir):
                try:
                    target = os.readlink(fd_dir / f)
                except FileNotFoundError:
                    continue
                if target.startswith("socket:"):
                    found.add(target)
            return found

        shared = listening(sup.pid)
        assert shared, "the supervisor holds the listening socket"
        assert all(shared & listening(pid) for pid in workers(sup.pid).values())  # the very same socket
        for pid in workers(sup.pid).values():
            os.kill(pid, signal.SIGKILL)
        until(lambda: not workers(sup.pid) or all(
            Path(f"/proc/{p}/stat").read_text().split(") ")[1].startswith("Z") for p in workers(sup.pid).values()))
        rc, out = swaks(dep, *send)  # no worker is up: the connection waits for the replacement's greeting
        assert rc == 0, out
        assert len(dep.delivered()) == 2
    finally:
        for p in (sup, sink):
            if p.poll() is None:
                p.kill()
                p.wait()
