"""A/B: latency through ``serve --workers 2`` at a steady rate, this tree against another revision.

    .venv/bin/python benchmarks/workers_ab.py [REV] [--rate 350] [-n 4000] [--rounds 4]

For each round, one tree then the other (A B A B ...: drift on a noisy machine hits both alike)
starts the relay with two workers in e2e.py's plaintext benchmark profile, delivering into
smtp-sink; this tree's loadgen.py sends 300 warm-up messages, then ``-n`` 10 KB replies at
``--rate`` messages/s, one per connection (open loop: a message starts on schedule whatever the
relay does, as Exchange Online's do). It reports p50/p99/max latency from connect to the final
reply and the relay's CPU per message, per round, and writes benchmarks/results-workers-ab.txt.
Made for the shared listening sockets (this tree) against SO_REUSEPORT (before them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from worktree import checkout

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CHILD = r'''
import json, shutil, sys, tempfile, time
from pathlib import Path
root = Path(sys.argv[1]); sys.path.insert(0, str(root / "benchmarks")); sys.path.insert(0, str(root))
import e2e
from run import outlook_reply
e2e.ROOT, e2e.LOADGEN = root, Path(sys.argv[4])  # this tree's load generator, whatever the tree
rate, n = float(sys.argv[2]), int(sys.argv[3])
work = Path(tempfile.mkdtemp(prefix="wab-"))
(work / "r.eml").write_bytes(outlook_reply().replace(b"\r\n", b"\n"))
sink_port, port, mport = e2e.free_port(), e2e.free_port(), e2e.free_port()
sink = e2e.Sink(sink_port)
relay = e2e.Relay(work, port, sink_port, mport, workers=2)
time.sleep(2)
try:
    e2e.loadgen(port, work / "r.eml", 300, 20, 1)
    c0 = e2e.cpu_seconds(relay.pids())
    res = e2e.loadgen(port, work / "r.eml", n, 20, 1, rate=rate)
    cpu = (e2e.cpu_seconds(relay.pids()) - c0) / max(1, res["sent"])
    lat = sorted(res["latencies"])
    q = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))]
    print(json.dumps({"p50": q(0.5), "p99": q(0.99), "max": lat[-1], "failed": res["failed"], "cpu_ms": 1000 * cpu}))
finally:
    relay.stop(); sink.stop()
    shutil.rmtree(work, ignore_errors=True)
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", nargs="?", default="HEAD", help="revision to compare against (default HEAD)")
    ap.add_argument("--rate", type=float, default=350.0, help="messages per second (default 350)")
    ap.add_argument("-n", type=int, default=4000, help="messages per round and tree (default 4000)")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    got: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
    with checkout(args.rev, "workers-ab-") as wt:
        for i in range(args.rounds):
            for name, root in (("base", wt), ("this", REPO)):
                out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(args.rate), str(args.n),
                                      str(HERE / "loadgen.py")], capture_output=True, text=True, timeout=900,
                                     env=dict(os.environ, PYTHONPATH=str(root)), check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                got[name].append(r)
                print(f"round {i + 1} {name}: p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, max {r['max']:.1f} ms, "
                      f"relay CPU {r['cpu_ms']:.2f} ms per message, failed {r['failed']:.0f}", flush=True)
    rows = [f"serve --workers 2 at {args.rate:.0f} messages/s (10 KB reply, one per connection, open loop, plaintext "
            f"profile, into smtp-sink), {args.n} messages per round, {args.rounds} alternating rounds; base = "
            f"{args.rev}, this = working tree"]
    for name in ("base", "this"):
        rs = got[name]
        rows.append(f"  {name}: p99 per round " + ", ".join(f"{r['p99']:.1f}" for r in rs)
                    + f" ms (median {statistics.median(r['p99'] for r in rs):.1f}); p50 median "
                    f"{statistics.median(r['p50'] for r in rs):.1f} ms; relay CPU median "
                    f"{statistics.median(r['cpu_ms'] for r in rs):.2f} ms per message; failed "
                    f"{sum(r['failed'] for r in rs):.0f}")
    text = "\n".join(rows)
    print(text)
    (HERE / "results-workers-ab.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
