"""A/B: what one message costs in wall time when the tenant endpoint is a WAN round trip away.

    .venv/bin/python benchmarks/wan_ab.py [REV] [--rtt MS]     (default HEAD, 40 ms; needs smtp-source/-sink)

Exchange Online is 10-200 ms away from a self-hosted relay, and the relay answers its own 250 only
after the endpoint's, so every round trip of the delivery is time the sender's connection waits.
This puts a delay proxy (``--proxy``: each direction delayed by half the round trip, order kept,
what netem would do; this machine's kernel has no netem) between the relay and Postfix's
``smtp-sink``, and sends 10 KB messages one after another, one per connection, from one
``smtp-source`` session, alternating this tree and REV (checked out into a temporary worktree) in
the same run. Writes benchmarks/results-wan-ab.txt with the per-message time of each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

from worktree import checkout

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


async def _proxy(listen: int, upstream: int, delay: float) -> None:
    loop = asyncio.get_running_loop()

    async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def out() -> None:
            while True:
                due, data = await q.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    w.close()
                    return
                w.write(data)
                await w.drain()

        sender = asyncio.create_task(out())
        try:
            while True:
                data = await r.read(65536)
                q.put_nowait((loop.time() + delay, data))
                if not data:
                    break
        except ConnectionError:
            q.put_nowait((loop.time(), b""))
        await sender

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(pump(r, uw), pump(ur, w), return_exceptions=True)

    server = await asyncio.start_server(serve, "127.0.0.1", listen, backlog=1024)
    async with server:
        await server.serve_forever()


CHILD = r'''
import subprocess, sys, tempfile, time
from pathlib import Path
root = Path(sys.argv[1]); rtt = float(sys.argv[2]); n = int(sys.argv[3])
sys.path.insert(0, str(root / "benchmarks")); sys.path.insert(0, str(root))
import e2e
from run import outlook_reply
e2e.ROOT = root
work = Path(tempfile.mkdtemp(prefix="wab-"))
(work / "r.eml").write_bytes(outlook_reply().replace(b"\r\n", b"\n"))
sink_port, proxy_port, port, mport = e2e.free_port(), e2e.free_port(), e2e.free_port(), e2e.free_port()
sink = e2e.Sink(sink_port)
proxy = subprocess.Popen([sys.executable, sys.argv[4], "--proxy", str(proxy_port), str(sink_port), str(rtt)])
e2e.wait_port(proxy_port, proxy)
relay = None
try:
    relay = e2e.Relay(work, port, proxy_port, mport)
    e2e.measure("relay", port, sink, work / "r.eml", "10", 5, 1, 1, relay.pids, 60)
    runs = [e2e.measure("relay", port, sink, work / "r.eml", "10", n, 1, 1, relay.pids, 300) for _ in range(2)]
    assert all(r.complete for r in runs), "not every message reached the sink"
    print(f"{1000 * min(r.seconds / r.n for r in runs):.1f}")
finally:  # the children hold our stdout: they must not outlive us
    if relay is not None:
        relay.stop()
    sink.stop(); proxy.kill()
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev", nargs="?", default="HEAD")
    p.add_argument("--rtt", type=float, default=40.0, help="round trip to the endpoint, ms (default 40)")
    p.add_argument("-n", type=int, default=40, help="messages per run (default 40)")
    p.add_argument("--proxy", nargs=3, metavar=("LISTEN", "UPSTREAM", "RTT_MS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.proxy:
        asyncio.run(_proxy(int(a.proxy[0]), int(a.proxy[1]), float(a.proxy[2]) / 2000))
        return
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", a.rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    res: dict[str, list[float]] = {"base": [], "this": []}
    with checkout(a.rev, "wan-ab-") as wt:
        for _ in range(3):
            for name, root in (("base", wt), ("this", REPO)):
                out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(a.rtt), str(a.n), __file__],
                                     capture_output=True, text=True, timeout=900, check=True,
                                     env=dict(os.environ, PYTHONPATH=str(root)))
                ms = float(out.stdout.strip().splitlines()[-1])
                res[name].append(ms)
                print(name, ms, "ms per message", flush=True)
    b, t = min(res["base"]), min(res["this"])
    line = (f"10 KB messages one after another (one smtp-source session, one per connection) through the relay "
            f"to smtp-sink {a.rtt:.0f} ms round trip away (delay proxy), same run, 3 alternating rounds: base "
            f"{a.rev} ({rev}) {b:.1f} ms per message, this tree {t:.1f} ms; this/base = {t / b:.3f}")
    print(line)
    (HERE / "results-wan-ab.txt").write_text(line + "\n")


if __name__ == "__main__":
    main()
