"""Chaos benchmark for queue mode (issue #12): does a 250 ever get lost?

    .venv/bin/python benchmarks/chaos.py [--messages 2000] [--clients 8] [--quick]

Part 1, crashes: the real relay (``serve --no-sink``, queue mode) runs as a child process next to
the real tenant-inbound sink; concurrent STARTTLS clients send messages with unique Message-IDs
and, like Exchange Online, retry anything that did not get a 250 (refused connection, 4xx,
dropped session). Meanwhile the relay is killed with SIGKILL at random moments and restarted, over
and over. At the end every Message-ID that got a 250 must be in the sink's Maildir: the report
gives the number lost (must be 0) and the duplicates (expected only from the window between the
tenant's 250 and the spool update, and from 250s lost with the killed connection).

Part 2, a tiny filesystem: the spool lives on a 2 MiB tmpfs (mounted here when permitted; without
the privilege, the same run uses ``min_free_space`` on the real filesystem). The tenant endpoint is
down, so the spool fills: the relay must answer 452 once it is full, and every 250 it gave must be
delivered once the endpoint comes back.

Writes benchmarks/results-chaos.txt and exits non-zero if anything was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import Deployment, make_deployment, wait_port  # noqa: E402

CLI = [sys.executable, "-m", "relay"]
MID = re.compile(rb"^Message-ID: <(chaos-[0-9a-z-]+)@contoso\.com>", re.M | re.I)


class Relay:
    """The relay as a child process that can be SIGKILLed and restarted."""

    def __init__(self, dep: Deployment, log: Path) -> None:
        self.dep, self.log = dep, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([*CLI, "serve", "--no-sink", "-c", str(self.dep.config_path)],
                                         cwd=ROOT, stdout=out, stderr=out)
        wait_port(self.dep.relay_port, self.proc, timeout=30)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_sink(dep: Deployment, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        p = subprocess.Popen([*CLI, "sink", "-c", str(dep.config_path)], cwd=ROOT, stdout=out, stderr=out)
    wait_port(dep.sink_port, p, timeout=30)
    return p


def message(mid: str, size: int = 0) -> bytes:
    body = "Hello Bob,\r\n\r\nchaos test.\r\n" + ("x" * 76 + "\r\n") * (size // 78)
    return (f"From: Alice <alice@contoso.com>\r\nTo: <bob@example.net>\r\nSubject: chaos {mid}\r\n"
            f"Message-ID: <{mid}@contoso.com>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}").encode()


async def send_once(dep: Deployment, ctx: ssl.SSLContext, raw: bytes) -> int:
    """One attempt; the reply code to DATA, or 0 when the session broke before a reply."""
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=dep.relay_port, start_tls=False, tls_context=ctx,
                        local_hostname="mail-x.outbound.protection.outlook.com", timeout=30)
    try:
        await c.connect()
        await c.starttls(server_hostname="smtp.signature-relay.test")
        r = await c.sendmail("alice@contoso.com", ["bob@example.net"], raw)
        return 250 if not r[0] else 0
    except aiosmtplib.SMTPResponseException as e:
        return e.code
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        return 0
    finally:
        c.close()


def delivered_ids(dep: Deployment) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for sub in ("new", "cur"):
        d = dep.maildir / sub
        if d.exists():
            for f in d.iterdir():
                m = MID.search(f.read_bytes()[:4096])
                if m:
                    out[m.group(1).decode()] += 1
    return out


def spool_empty(spool: Path) -> bool:
    return not spool.exists() or not any(spool.glob("*.json"))


async def drained(spool: Path, seconds: float) -> None:
    """Poll the spool (a directory has no event to wait on) until it is empty or time is up."""
    for _ in range(int(seconds / 0.2)):
        if await asyncio.to_thread(spool_empty, spool):
            return
        await asyncio.sleep(0.2)


async def crashes(dep: Deployment, ctx: ssl.SSLContext, n: int, clients: int, logs: Path) -> dict[str, float]:
    relay = Relay(dep, logs / "relay.log")
    sink = start_sink(dep, logs / "sink.log")
    relay.start()
    todo: asyncio.Queue[str] = asyncio.Queue()
    for i in range(n):
        todo.put_nowait(f"chaos-{i}")
    acked: set[str] = set()
    attempts = collections.Counter[int]()
    tries: collections.Counter[str] = collections.Counter()
    done = asyncio.Event()
    t0 = time.monotonic()

    async def client() -> None:
        while not todo.empty():
            mid = todo.get_nowait()
            while True:
                code = await send_once(dep, ctx, message(mid))
                attempts[code] += 1
                tries[mid] += 1
                if code == 250:
                    acked.add(mid)
                    break
                await asyncio.sleep(0.05)  # Exchange Online retries too (much later; we are impatient)
        if len(acked) == n:
            done.set()

    async def killer() -> None:
        while not done.is_set():
            await asyncio.sleep(random.uniform(0.3, 1.5))
            if done.is_set():
                break
            await asyncio.to_thread(relay.kill)
            await asyncio.to_thread(relay.start)
            print(f"\r  kills {relay.kills:3d}  acked {len(acked):5d}/{n}", end="", file=sys.stderr, flush=True)

    await asyncio.gather(killer(), *(client() for _ in range(clients)))
    sent_s = time.monotonic() - t0
    spool = dep.root / "var" / "spool"
    await drained(spool, 120)
    await asyncio.sleep(2.0)  # anything still in flight lands
    got = delivered_ids(dep)
    relay.stop()
    sink.send_signal(signal.SIGTERM)
    sink.wait(timeout=20)
    print(file=sys.stderr)
    return {"messages": n, "clients": clients, "kills": relay.kills, "acked": len(acked),
            "lost": len(acked - set(got)), "duplicates": sum(c - 1 for c in got.values() if c > 1),
            # a duplicate of a message the client sent once can only come from the window between
            # the tenant's 250 and the spool update; the others may also be a 250 lost with the
            # killed session, after which the client sent the message again (RFC 1047)
            "duplicates_sent_once": sum(c - 1 for m, c in got.items() if c > 1 and tries[m] == 1),
            "delivered_files": sum(got.values()), "unacked_but_delivered": len(set(got) - acked),
            "refused_or_broken_attempts": sum(v for k, v in attempts.items() if k != 250),
            "seconds": round(sent_s, 1), "spool_left": 0 if spool_empty(spool) else len(list(spool.glob("*.json")))}


@contextlib.contextmanager
def tiny_fs(where: Path) -> Iterator[bool]:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True)
    try:
        yield r.returncode == 0
    finally:
        if r.returncode == 0:
            subprocess.run(["umount", str(where)], capture_output=True)


async def full_disk(dep: Deployment, ctx: ssl.SSLContext, logs: Path) -> dict[str, object]:
    spool = dep.root / "tinyspool"
    with tiny_fs(spool) as mounted:
        cfg = dep.config_path.read_text()
        if mounted:
            extra = f'spool_dir = "{spool}"\nmin_free_space = 0\n'  # real ENOSPC from the kernel
        else:  # no privilege to mount: the threshold on the real filesystem, 2 MiB above what is free now
            st = os.statvfs(dep.root)
            extra = f'spool_dir = "{spool}"\nmin_free_space = {st.f_bavail * st.f_frsize - 2 * 1024 * 1024}\n'
        dep.config_path.write_text(cfg.replace('mode = "queue"\n', 'mode = "queue"\n' + extra))
        relay = Relay(dep, logs / "relay-full.log")
        relay.start()  # the tenant endpoint is down: everything stays in the spool
        codes: collections.Counter[int] = collections.Counter()
        acked: set[str] = set()
        for i in range(60):  # 60 x ~100 KB: far more than 2 MiB
            mid = f"chaos-full-{i}"
            code = await send_once(dep, ctx, message(mid, size=100_000))
            codes[code] += 1
            if code == 250:
                acked.add(mid)
        before = delivered_ids(dep)
        sink = start_sink(dep, logs / "sink-full.log")
        await drained(spool, 60)
        await asyncio.sleep(1.0)
        after = await send_once(dep, ctx, message("chaos-full-after", size=100_000))  # room again
        await asyncio.sleep(1.0)
        got = delivered_ids(dep) - before
        relay.stop()
        sink.send_signal(signal.SIGTERM)
        sink.wait(timeout=20)
        dep.config_path.write_text(cfg)
    return {"filesystem": "tmpfs 2 MiB (real ENOSPC)" if mounted else "real disk, min_free_space threshold",
            "replies": dict(sorted(codes.items())), "acked": len(acked), "lost": len(acked - set(got)),
            "duplicates": sum(c - 1 for c in got.values() if c > 1), "accepted_after_drain": after}


async def run(n: int, clients: int, seed: int) -> tuple[dict[str, float], dict[str, object]]:
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        root = Path(tmp)
        dep = make_deployment(root)
        dep.config_path.write_text(dep.config_path.read_text().replace(
            "[delivery]\n", '[delivery]\nmode = "queue"\nretry_min = 0.2\nretry_max = 1.0\n'))
        ctx = ssl.create_default_context(cafile=str(root / "certs" / "ca.crt"))
        print(f"part 1: {n} messages, {clients} clients, SIGKILL every 0.3-1.5 s (seed {seed})", file=sys.stderr)
        one = await crashes(dep, ctx, n, clients, root)
        print("part 2: spool on a tiny filesystem, endpoint down", file=sys.stderr)
        two = await full_disk(dep, ctx, root)
    return one, two


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="300 messages (a smoke run)")
    ap.add_argument("--seed", type=int, default=None, help="random seed for the kill times")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results-chaos.txt",
                    help="where to write the report (default: benchmarks/results-chaos.txt)")
    args = ap.parse_args()
    n = 300 if args.quick else args.messages
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    random.seed(seed)
    one, two = asyncio.run(run(n, args.clients, seed))
    lines = ["chaos benchmark (issue #12): queue mode, real relay and sink processes",
             f"part 1, crashes (seed {seed}): " + ", ".join(f"{k}={v}" for k, v in one.items()),
             "part 2, full spool: " + ", ".join(f"{k}={v}" for k, v in two.items())]
    ok = one["lost"] == 0 and two["lost"] == 0 and 452 in two["replies"]  # type: ignore[operator]
    lines.append("RESULT: " + ("no 250 was lost" if ok else "FAILED: a 250 was lost or no 452 was seen"))
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
