"""A small SMTP load generator with STARTTLS (Postfix's smtp-source has none), for
benchmarks/e2e.py: closed loop (``--rate 0``: each session sends as fast as replies come) or open
loop (``--rate R``: messages start on a fixed schedule, whatever the server does, so the latency
it reports includes queueing, as a real sender sees it).

    python benchmarks/loadgen.py --port 2525 --message m.eml -n 1000 -s 20 [--per-conn 10] [--tls --ca ca.crt]
                                 [--pipelining]

``--message`` may name a directory: its *.eml files are sent in turn (sorted by name, round
robin over all sessions), as a mix of real mail.

Prints one JSON object: sent, failed, seconds, latencies (ms, per message: connection start or
MAIL to the final reply), late (open loop: ms each message started after its scheduled time).
A message counts as sent only on a 2xx reply to its end of data.
Runs on uvloop when it is installed (it is a dependency of the relay), else on asyncio's loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any


class Session:
    def __init__(self, args: argparse.Namespace, ctx: ssl.SSLContext | None) -> None:
        self.args, self.ctx = args, ctx
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def reply(self) -> int:
        while True:
            # A connection the server's full accept queue dropped looks established to us and
            # never gets a greeting (Linux, tcp_abort_on_overflow=0): a failure, not a hang.
            line = await asyncio.wait_for(self.reader.readline(), self.args.timeout)
            if not line:
                raise ConnectionError("connection closed")
            if line[3:4] != b"-":
                return int(line[:3])

    async def cmd(self, line: bytes, want: int) -> None:
        self.writer.write(line + b"\r\n")
        code = await self.reply()
        if code // 100 != want // 100:
            raise RuntimeError(f"{line.split()[0].decode()}: {code}")

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.args.host, self.args.port, limit=2**20)
        if await self.reply() != 220:
            raise RuntimeError("no 220 greeting")
        await self.cmd(b"EHLO loadgen.bench.test", 250)
        if self.ctx is not None:
            await self.cmd(b"STARTTLS", 220)
            await self.writer.start_tls(self.ctx, server_hostname=self.args.server_name)
            await self.cmd(b"EHLO loadgen.bench.test", 250)

    async def send(self, data: bytes) -> None:
        mail = b"MAIL FROM:<" + self.args.sender.encode() + b">"
        rcpt = b"RCPT TO:<" + self.args.rcpt.encode() + b">"
        if self.args.pipelining:
            # RFC 2920: MAIL, RCPT and DATA as one group, as Exchange Online sends them to a
            # server that advertises PIPELINING; then the three replies in order.
            self.writer.write(mail + b"\r\n" + rcpt + b"\r\nDATA\r\n")
            for want, what in ((250, "MAIL"), (250, "RCPT"), (354, "DATA")):
                code = await self.reply()
                if code // 100 != want // 100:
                    raise RuntimeError(f"{what}: {code}")
        else:
            await self.cmd(mail, 250)
            await self.cmd(rcpt, 250)
            await self.cmd(b"DATA", 354)
        self.writer.write(data)
        code = await self.reply()
        if code // 100 != 2:
            raise RuntimeError(f"end of data: {code}")

    async def close(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), 5)
        except (OSError, RuntimeError, TimeoutError, ConnectionError):
            pass
        self.writer.close()


class Stats:
    def __init__(self, n: int, messages: list[bytes]) -> None:
        self.todo = n
        self.latencies: list[float] = []
        self.late: list[float] = []  # open loop: how late each message started (ms; the generator's own lag)
        self.failed: list[str] = []
        self.messages, self.next = messages, 0

    def take(self) -> bool:
        if self.todo <= 0:
            return False
        self.todo -= 1
        return True

    def message(self) -> bytes:
        """The next message to send (the files of a --message directory in turn)."""
        data = self.messages[self.next % len(self.messages)]
        self.next += 1
        return data


ERRORS = (OSError, RuntimeError, ConnectionError, ssl.SSLError)


async def closed_loop(args: argparse.Namespace, ctx: ssl.SSLContext | None, st: Stats) -> None:
    """One session slot: connections one after another, ``per_conn`` messages each."""
    while st.take():  # a message is taken before its connection: a failure uses it up (no endless retry)
        s = Session(args, ctx)
        start = time.perf_counter()
        try:
            await s.open()
            for i in range(args.per_conn):
                if i and not st.take():
                    break
                await s.send(st.message())
                st.latencies.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
        except ERRORS as e:
            st.failed.append(str(e))
        finally:
            if getattr(s, "writer", None) is not None:
                await s.close()


async def one(args: argparse.Namespace, ctx: ssl.SSLContext | None, st: Stats, at: float) -> None:
    """Open loop: one message on its own connection, started at ``at`` whatever came before."""
    s = Session(args, ctx)
    start = time.perf_counter()
    st.late.append((start - at) * 1000)
    try:
        await s.open()
        await s.send(st.message())
        st.latencies.append((time.perf_counter() - start) * 1000)
    except ERRORS as e:
        st.failed.append(str(e))
    finally:
        if getattr(s, "writer", None) is not None:
            await s.close()


async def open_loop(args: argparse.Namespace, ctx: ssl.SSLContext | None, st: Stats, t0: float) -> None:
    """Each message's task is made at its start time. Made all at once up front (thousands of
    sleeping tasks), the first ~40 messages of every run started up to 40 ms late while the loop
    worked through them, and their latency counted that: about 1 % of a run, right at its p99."""
    running: set[asyncio.Task[None]] = set()
    for i in range(args.n):
        at = t0 + i / args.rate
        if (wait := at - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        task = asyncio.create_task(one(args, ctx, st, at))
        running.add(task)
        task.add_done_callback(running.discard)
    while running:
        await asyncio.gather(*running)


def wire_form(raw: bytes) -> bytes:
    """The message as DATA content: CRLF line endings, dot-stuffed (RFC 5321 §4.5.2), final dot."""
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    data = (b"." if raw.startswith(b".") else b"") + raw.replace(b"\r\n.", b"\r\n..")
    return data + (b"" if data.endswith(b"\r\n") else b"\r\n") + b".\r\n"


async def main(args: argparse.Namespace, raws: list[bytes]) -> dict[str, object]:
    st = Stats(args.n, [wire_form(raw) for raw in raws])
    ctx = ssl.create_default_context(cafile=args.ca) if args.tls else None
    t0 = time.perf_counter()
    if args.rate > 0:
        await open_loop(args, ctx, st, t0)
    else:
        await asyncio.gather(*(closed_loop(args, ctx, st) for _ in range(args.sessions)))
    return {"sent": len(st.latencies), "failed": len(st.failed), "errors": sorted(set(st.failed))[:5],
            "seconds": time.perf_counter() - t0, "latencies": st.latencies, "late": st.late}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--message", required=True)
    ap.add_argument("-n", type=int, default=1000, help="messages")
    ap.add_argument("-s", "--sessions", type=int, default=20, help="concurrent sessions (closed loop)")
    ap.add_argument("--per-conn", type=int, default=1, help="messages per connection (closed loop)")
    ap.add_argument("--rate", type=float, default=0.0, help="open loop: messages per second (0: closed loop)")
    ap.add_argument("--pipelining", action="store_true",
                    help="send MAIL, RCPT and DATA as one group (RFC 2920), as Exchange Online does")
    ap.add_argument("--tls", action="store_true", help="STARTTLS, verifying the server against --ca")
    ap.add_argument("--ca", help="CA bundle for --tls")
    ap.add_argument("--server-name", default="smtp.signature-relay.test")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for any one reply (then: failed)")
    ap.add_argument("--sender", default="alice@contoso.com")
    ap.add_argument("--rcpt", default="bob@example.net")
    args = ap.parse_args()
    where = Path(args.message)
    files = sorted(where.glob("*.eml")) if where.is_dir() else [where]
    if not files:
        raise SystemExit(f"loadgen: no *.eml in {where}")
    run: Callable[[Coroutine[Any, Any, dict[str, object]]], dict[str, object]]
    try:
        # The load generator shares the benchmark machine's cores with the system under test:
        # on uvloop it cost 0.66-0.73 instead of 1.22-1.25 ms of CPU per message (open loop at
        # 500 msg/s, the 10 KB reply into smtp-sink, two runs each).
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    json.dump(run(main(args, [f.read_bytes() for f in files])), sys.stdout)
