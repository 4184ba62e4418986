"""A/B: cut-through delivery on and off (``delivery.cut_through_after``), same tree, same run.

    .venv/bin/python benchmarks/cut_ab.py [ROUNDS]        (default 6; needs Postfix's smtp-sink/-source)

Two relays from this tree in e2e.py's plaintext benchmark profile, one with cut-through (the
default, ``cut_through_after`` = 256 KiB) and one with it off (0), both delivering into one
smtp-sink. Each round sends the 25 MB-attachment message to one then the other (A B A B ...:
drift on a noisy machine hits both alike) from two clients:

* **fast**: smtp-source, 4 messages one after another, as ``make bench-e2e``'s 1 × 25 MB row.
  The client is faster than the relay, so the message is in within 30-50 ms and only the
  relay's own checks and stamping overlap with writing to the endpoint.
* **paced**: the same message written at 100 MB/s (a client on a network: Exchange Online's
  outbound servers over the internet are slower still), timed from DATA to the relay's 250.
  Here the endpoint gets the message while it arrives.

Prints each round and the medians, with the paired ratios (cut-through ÷ store and forward), and
writes them to benchmarks/results-cut-ab.txt. The smtp-sink alone (smtp-source straight into it)
is measured at the end, as the ceiling.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import e2e  # noqa: E402
from run import with_attachment  # noqa: E402

from tests.support import free_port  # noqa: E402

PACE = 100e6  # octets per second for the paced client
MB = 1e6


async def paced(port: int, raw: bytes, rate: float) -> float:
    """Seconds from DATA to the relay's reply for ``raw`` written at ``rate`` octets per second."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if line[3:4] != b"-":
                return line

    await reply()
    for cmd in (b"EHLO client.test", b"MAIL FROM:<alice@contoso.com>", b"RCPT TO:<bob@example.net>"):
        writer.write(cmd + b"\r\n")
        assert (await reply()).startswith(b"250")
    writer.write(b"DATA\r\n")
    assert (await reply()).startswith(b"354")
    data = raw.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    t0 = time.perf_counter()
    step = 256 * 1024
    for i in range(0, len(data), step):
        writer.write(data[i:i + step])
        await writer.drain()
        ahead = t0 + (i + step) / rate - time.perf_counter()
        if ahead > 0:
            await asyncio.sleep(ahead)
    got = await reply()
    took = time.perf_counter() - t0
    assert got.startswith(b"250"), got
    writer.write(b"QUIT\r\n")
    await reply()
    writer.close()
    return took


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    work = Path(tempfile.mkdtemp(prefix="cut-ab-"))
    raw = with_attachment(25, html=True)
    (work / "r.eml").write_bytes(raw.replace(b"\r\n", b"\n"))  # smtp-source sends LF lines as CRLF
    sink_port = free_port()
    sink = e2e.Sink(sink_port)
    relays: dict[str, tuple[e2e.Relay, int]] = {}
    lines: list[str] = []
    try:
        for name in ("cut-through", "store and forward"):
            w = work / name.replace(" ", "-")
            w.mkdir()
            port = free_port()
            r = e2e.Relay(w, port, sink_port, free_port())
            if name == "store and forward":  # the same profile with cut-through off
                r.proc.terminate()
                r.proc.wait()
                r.conf.write_text(r.conf.read_text().replace("[delivery]\n", "[delivery]\ncut_through_after = 0\n"))
                r.proc = r._start()
            relays[name] = (r, port)
        fast: dict[str, list[tuple[float, float]]] = {k: [] for k in relays}
        slow: dict[str, list[float]] = {k: [] for k in relays}
        for _name, (r, port) in relays.items():  # warm-up
            e2e.measure("relay", port, sink, work / "r.eml", "25", 1, 1, 1, r.pids, 300)
        for i in range(rounds):
            for name, (r, port) in relays.items():
                m = e2e.measure("relay", port, sink, work / "r.eml", "25", 4, 1, 1, r.pids, 300)
                fast[name].append((m.rate * len(raw) / MB, 1000 * (m.cpu or 0) / m.n))
                slow[name].append(asyncio.run(paced(port, raw, PACE)))
            line = f"round {i + 1}: " + "; ".join(
                f"{k}: fast {fast[k][-1][0]:.1f} MB/s ({fast[k][-1][1]:.0f} ms CPU), paced {1000 * slow[k][-1]:.0f} ms"
                for k in relays)
            print(line, flush=True)
            lines.append(line)
        alone = e2e.measure("direct", sink_port, sink, work / "r.eml", "25", 4, 1, 1, None, 300)
        a, b = "cut-through", "store and forward"
        fr = [x[0] / y[0] for x, y in zip(fast[a], fast[b], strict=True)]
        sr = [y / x for x, y in zip(slow[a], slow[b], strict=True)]
        med = statistics.median
        summary = [
            f"25 MB attachment, {rounds} alternating rounds; medians:",
            f"  fast client (smtp-source): cut-through {med(x[0] for x in fast[a]):.1f} MB/s "
            f"({med(x[1] for x in fast[a]):.0f} ms CPU), store and forward "
            f"{med(x[0] for x in fast[b]):.1f} MB/s ({med(x[1] for x in fast[b]):.0f} ms CPU);"
            f" paired MB/s ratio {med(fr):.2f} (rounds: {' '.join(f'{x:.2f}' for x in fr)})",
            f"  paced client ({PACE / MB:.0f} MB/s, DATA to 250): cut-through {1000 * med(slow[a]):.0f} ms,"
            f" store and forward {1000 * med(slow[b]):.0f} ms; the message alone takes "
            f"{1000 * len(raw) / PACE:.0f} ms to send; paired speed-up {med(sr):.2f}"
            f" (rounds: {' '.join(f'{x:.2f}' for x in sr)})",
            f"  smtp-sink alone (smtp-source straight into it, after the rounds): "
            f"{alone.rate * len(raw) / MB:.1f} MB/s",
        ]
        print("\n".join(summary))
        (HERE / "results-cut-ab.txt").write_text(
            f"# benchmarks/cut_ab.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
            + "\n".join(lines + summary) + "\n")
    finally:
        for r, _ in relays.values():
            r.stop()
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
