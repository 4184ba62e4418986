"""A/B: the relay's own CPU per 10 KB message, this tree against another revision, in the same run.

    .venv/bin/python benchmarks/relay_ab.py [REV]        (default HEAD; needs Postfix's smtp-source/-sink)

The base revision is checked out into a temporary git worktree. Each round starts the relay from
one tree then the other (A B A B ...: drift on a noisy machine hits both alike) in e2e.py's
plaintext benchmark profile, sends 500 warm-up then 3 x 3000 messages with smtp-source (20
sessions, one message per connection) into smtp-sink, and takes the least CPU per message of the
relay's processes. Writes benchmarks/results-relay-ab.txt.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
wt = Path(tempfile.mkdtemp(prefix="relay-ab-")) / "base"
subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(wt), rev], check=True, capture_output=True)
child = r'''
import sys, tempfile
from pathlib import Path
root = Path(sys.argv[1]); sys.path.insert(0, str(root / "benchmarks")); sys.path.insert(0, str(root))
import e2e
from run import outlook_reply
e2e.ROOT = root
work = Path(tempfile.mkdtemp(prefix="sab-"))
(work / "r.eml").write_bytes(outlook_reply().replace(b"\r\n", b"\n"))
sink_port, port, mport = e2e.free_port(), e2e.free_port(), e2e.free_port()
sink = e2e.Sink(sink_port); relay = e2e.Relay(work, port, sink_port, mport)
e2e.measure("relay", port, sink, work / "r.eml", "10", 500, 20, 1, relay.pids, 60)
runs = [e2e.measure("relay", port, sink, work / "r.eml", "10", 3000, 20, 1, relay.pids, 120) for _ in range(3)]
best = min(r.cpu / r.n for r in runs)
print(f"{1000*best:.3f}")
relay.stop(); sink.stop()
'''
res: dict[str, list[float]] = {"base": [], "this": []}
try:
    for _ in range(3):
        for name, root in (("base", wt), ("this", REPO)):
            env = dict(os.environ, PYTHONPATH=str(root))
            out = subprocess.run([sys.executable, "-c", child, str(root)], capture_output=True, text=True, env=env,
                                 timeout=600, check=True)
            res[name].append(float(out.stdout.strip().splitlines()[-1]))
            print(name, res[name][-1], flush=True)
finally:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], capture_output=True)
b, t = min(res["base"]), min(res["this"])
line = (f"relay CPU per 10 KB message (smtp-source, 20 sessions, one per connection, plaintext profile), "
        f"same run, 3 alternating rounds: base {rev} {b:.3f} ms, this tree {t:.3f} ms; this/base = {t / b:.3f}")
print(line)
(HERE / "results-relay-ab.txt").write_text(line + "\n")
