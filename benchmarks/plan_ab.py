"""A/B: the relay's pure work per message (ingress's accept, then bind_and_plan: binding, rules,
templates, stamping, trace), this tree against another revision, in-process and in the same run.

    .venv/bin/python benchmarks/plan_ab.py [REV]    (default HEAD)

No sockets and no load generator, so the figure moves little between runs (relay_ab.py's does):
use it for changes to the pure core, relay_ab.py for the whole relay. The base revision is
checked out into a temporary git worktree; child processes alternate between the trees (A B A B
A B). Each child loads the configuration bench-e2e's relay runs with (e2e.Relay's plaintext
benchmark profile, the sample tenant's rules and signatures), checks the message is stamped, and
times batches of the 10 KB reply, the same with Exchange Online's header section
(tests/exo_mail.py) and the 200 KB HTML message with inline images; the best batch of each tree's
best round is reported. Writes benchmarks/results-plan-ab.txt.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from worktree import checkout

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CHILD = r'''
import datetime as dt, sys, tempfile, time
from pathlib import Path
root = Path(sys.argv[1]); sys.path.insert(0, str(root / "benchmarks")); sys.path.insert(0, str(root))
import e2e
e2e.ROOT = root
from run import outlook_reply, outlook_reply_from_exchange_online
from relay import binding, config, pipeline, policy
from relay.flow import bind_and_plan
work = Path(tempfile.mkdtemp(prefix="plan-ab-"))
relay = e2e.Relay(work, e2e.free_port(), e2e.free_port(), e2e.free_port())  # writes the config and PKI
relay.stop()
cfg = policy.attach(config.load(relay.conf))
peer = binding.Peer(ip="127.0.0.1", cert_names=(), sni=None)
received = b"Received: from a ([127.0.0.1])\r\n\tby b; Sun, 29 Nov 2026 04:00:00 +0000\r\n"
settings = pipeline.Settings.of(cfg)
for name, raw in (("10 KB reply", outlook_reply()), ("10 KB reply, Exchange Online's header",
                  outlook_reply_from_exchange_online()), ("200 KB HTML + inline images", e2e.html_with_images())):
    def once(raw=raw):
        inbound = pipeline.accept(raw, settings)
        return bind_and_plan(cfg, inbound, "alice@contoso.com", ["bob@example.net"], peer, dt.datetime.now(dt.UTC),
                             lambda _group: received)
    action = once().copies[0].processed.decision.action
    if action != "stamped":
        raise SystemExit(f"{name}: {action}, not stamped")
    n = 40 if name.startswith("200") else 300
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(n):
            once()
        best = min(best, (time.perf_counter() - t) / n)
    print(f"{name}\t{best * 1e6:.1f}")
import shutil
shutil.rmtree(work, ignore_errors=True)
'''


def main() -> int:
    rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
    res: dict[str, dict[str, list[float]]] = {"base": {}, "this": {}}
    with checkout(rev, "plan-ab-") as wt:
        for i in range(3):
            for tree, root in (("base", wt), ("this", REPO)):
                out = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True,
                                     env=dict(os.environ, PYTHONPATH=str(root)), timeout=600, check=False)
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                for line in out.stdout.strip().splitlines():
                    name, us = line.split("\t")
                    res[tree].setdefault(name, []).append(float(us))
            print(f"round {i + 1} of 3 done", flush=True)
    lines = [f"accept + bind_and_plan per message, in-process, same run, 3 alternating rounds, best batch; base {rev}:"]
    for name in res["base"]:
        b, t = min(res["base"][name]), min(res["this"][name])
        lines.append(f"  {name}: base {b:.1f} µs, this tree {t:.1f} µs; this/base = {t / b:.3f}")
    print("\n".join(lines))
    (HERE / "results-plan-ab.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
