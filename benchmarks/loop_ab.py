"""A/B: the same relay on asyncio's event loop and on uvloop ([service] event_loop), same run.

    .venv/bin/python benchmarks/loop_ab.py [--rate R] [-n N] [--rounds K]   (needs smtp-source/-sink)

Two relays from this tree, identical but for ``event_loop = "asyncio"`` / ``"uvloop"``, in the
benchmark profile of ``benchmarks/e2e.py`` (plaintext on loopback both sides) into one Postfix
``smtp-sink``. Alternating rounds of:

* open loop: ``benchmarks/loadgen.py --rate R``, one 10 KB message per connection started on a fixed
  schedule (Exchange Online's kind of load: far below saturation). Relay CPU per message (its
  process, from /proc), and latency p50/p99 from connect to the final reply;
* closed loop: 20 ``smtp-source`` sessions flat out; messages/s and relay CPU per message.

Writes benchmarks/results-loop-ab.txt. The relay's CPU per message is the figure to compare: at a
fixed rate, less CPU per message is a less busy relay, which is what latency percentiles see.
"""

from __future__ import annotations

import argparse
import os
import re
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
from run import outlook_reply  # noqa: E402

from tests.support import free_port  # noqa: E402

LOOPS = ("asyncio", "uvloop")


def relay_on(work: Path, sink_port: int, loop: str) -> e2e.Relay:
    d = work / loop
    d.mkdir()
    r = e2e.Relay(d, free_port(), sink_port, free_port())
    r.conf.write_text(r.conf.read_text().replace("[service]\n", f'[service]\nevent_loop = "{loop}"\n', 1))
    r.restart()
    return r


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=400.0, help="open loop: messages per second (default 400)")
    ap.add_argument("-n", type=int, default=2000, help="messages per open-loop round (default 2000)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=HERE / "results-loop-ab.txt")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loop-ab-"))
    os.chmod(work, 0o755)
    msg = work / "m.eml"
    msg.write_bytes(outlook_reply().replace(b"\r\n", b"\n"))  # smtp-source -F sends lines with CRLF
    sink_port = free_port()
    sink = e2e.Sink(sink_port)
    relays: dict[str, e2e.Relay] = {}
    open_cpu: dict[str, list[float]] = {k: [] for k in LOOPS}
    open_p50: dict[str, list[float]] = {k: [] for k in LOOPS}
    open_p99: dict[str, list[float]] = {k: [] for k in LOOPS}
    closed: dict[str, list[tuple[float, float]]] = {k: [] for k in LOOPS}
    try:
        for loop in LOOPS:
            relays[loop] = relay_on(work, sink_port, loop)
            e2e.loadgen(relays[loop].port, msg, 200, 0, 1, rate=args.rate)  # warm-up
        for rnd in range(args.rounds):
            for loop in (LOOPS if rnd % 2 == 0 else LOOPS[::-1]):
                r = relays[loop]
                c0 = e2e.cpu_seconds(r.pids())
                got = e2e.loadgen(r.port, msg, args.n, 0, 1, rate=args.rate)
                cpu = 1000 * (e2e.cpu_seconds(r.pids()) - c0) / args.n
                if got["failed"]:
                    raise SystemExit(f"loop_ab: {loop}: {got['failed']} failed: {got['errors']}")
                lat = got["latencies"]
                open_cpu[loop].append(cpu)
                open_p50[loop].append(pct(lat, 0.5))
                open_p99[loop].append(pct(lat, 0.99))
                c = e2e.measure(loop, r.port, sink, msg, "10 KB", 3000, 20, 1, r.pids, 300)
                closed[loop].append((c.rate, 1000 * (c.cpu or 0) / c.n))
                print(f"round {rnd + 1} {loop:8}: open loop {args.rate:.0f} msg/s: relay CPU {cpu:.3f} ms/msg, "
                      f"p50 {pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms; closed loop {c.rate:.0f} msg/s, "
                      f"{closed[loop][-1][1]:.3f} ms/msg", flush=True)
        for loop in LOOPS:  # what serve said it runs on
            relays[loop].stop()
            # the last start's line (the first start, before event_loop was written, said "auto"'s choice)
            said = re.findall(r"ready: .*, event loop (\S+)", (relays[loop].work / "relay.log").read_text())
            if not said or said[-1] != loop:
                raise SystemExit(f"loop_ab: the {loop} relay said it ran on {said[-1] if said else 'nothing'}")
    finally:
        for r in relays.values():
            if r.proc.poll() is None:
                r.stop()
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    a, u = "asyncio", "uvloop"
    lines = [
        f"benchmarks/loop_ab.py, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC: the relay of this tree "
        f"on asyncio's loop and on uvloop, same run, {args.rounds} alternating rounds (median of rounds), "
        "10 KB message, one per connection, plaintext benchmark profile into smtp-sink.",
        f"open loop at {args.rate:.0f} msg/s, {args.n} messages a round: relay CPU per message asyncio "
        f"{med(open_cpu[a]):.3f} ms, uvloop {med(open_cpu[u]):.3f} ms (uvloop/asyncio = "
        f"{med(open_cpu[u]) / med(open_cpu[a]):.2f}); latency p50 {med(open_p50[a]):.1f} / {med(open_p50[u]):.1f} ms, "
        f"p99 {med(open_p99[a]):.1f} / {med(open_p99[u]):.1f} ms",
        f"closed loop, 20 sessions: asyncio {med([x[0] for x in closed[a]]):.0f} msg/s at "
        f"{med([x[1] for x in closed[a]]):.3f} ms CPU/msg, uvloop {med([x[0] for x in closed[u]]):.0f} msg/s at "
        f"{med([x[1] for x in closed[u]]):.3f} ms CPU/msg (uvloop/asyncio CPU = "
        f"{med([x[1] for x in closed[u]]) / med([x[1] for x in closed[a]]):.2f})",
        "rounds: " + "; ".join(f"{k} open CPU {', '.join(f'{x:.3f}' for x in open_cpu[k])} ms, p99 "
                               f"{', '.join(f'{x:.1f}' for x in open_p99[k])} ms" for k in LOOPS),
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
