"""A/B: the relay's own CPU per 10 KB message, this tree against another revision, in the same run.

    .venv/bin/python benchmarks/relay_ab.py [REV]        (default HEAD; needs Postfix's smtp-source/-sink)
    .venv/bin/python benchmarks/relay_ab.py --big [REV]  (the 25 MB-attachment message instead)
    .venv/bin/python benchmarks/relay_ab.py --tls [REV]  (STARTTLS on both sides, as bench-e2e's TLS phase)
    .venv/bin/python benchmarks/relay_ab.py --mix [REV]  (real mail: every message of the public corpora)
    .venv/bin/python benchmarks/relay_ab.py --exo [REV]  (the 10 KB reply with Exchange Online's header)
    .venv/bin/python benchmarks/relay_ab.py --html [REV] (the 200 KB HTML message with inline images)

The base revision is checked out into a temporary git worktree. Each round starts the relay from
one tree then the other (A B A B ...: drift on a noisy machine hits both alike) in e2e.py's
plaintext benchmark profile, sends 500 warm-up then 3 x 3000 messages with smtp-source (20
sessions, one message per connection) into smtp-sink, and takes the least CPU per message of the
relay's processes. Writes benchmarks/results-relay-ab.txt. With ``--big``: one session sends
the 25 MB-attachment message 1 + 3 x 4 times (one after another, so MB/s is one message's end to
end rate) and the line goes to benchmarks/results-relay-ab-big.txt. With ``--tls``: STARTTLS on
both sides, loadgen.py sends 300 warm-up then 3 x 1500 messages (20 sessions, one per connection)
into a private Postfix TLS sink that discards, as bench-e2e's STARTTLS phase does
(results-relay-ab-tls.txt). With ``--mix``: the real-mail mix of bench-e2e (every message of the
public corpora in tests/data, From: set to the benchmark sender; e2e.real_mail_mix), sent in turn
by this tree's loadgen.py, plaintext, 20 sessions, one message per connection, 300 warm-up then
3 x 3 passes over the mix, into smtp-sink (results-relay-ab-mix.txt). With ``--exo``: as the default,
with the 10 KB reply carrying the header section Exchange Online hands a connector
(tests/exo_mail.py: 58 fields, 12 KB; results-relay-ab-exo.txt). With ``--html``: as the default, with
bench-e2e's 200 KB HTML message with inline images (e2e.html_with_images; results-relay-ab-html.txt).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from worktree import checkout

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
args = [a for a in sys.argv[1:] if a not in ("--big", "--tls", "--mix", "--exo", "--html")]
big = "--big" in sys.argv[1:]
tls = "--tls" in sys.argv[1:]
mix = "--mix" in sys.argv[1:]
exo = "--exo" in sys.argv[1:]
html = "--html" in sys.argv[1:]
rev = args[0] if args else "HEAD"
child = r'''
import sys, tempfile
from pathlib import Path
root = Path(sys.argv[1]); sys.path.insert(0, str(root / "benchmarks")); sys.path.insert(0, str(root))
import e2e
from run import outlook_reply, with_attachment
e2e.ROOT = root
big = sys.argv[2] == "big"
work = Path(tempfile.mkdtemp(prefix="sab-"))
import atexit, shutil
atexit.register(shutil.rmtree, work, True)
# --exo, --html: the message comes from the parent (this tree builds it; an older tree may not know it)
raw = with_attachment(25, html=True) if big else Path(sys.argv[3]).read_bytes() if sys.argv[2] == "file" \
    else outlook_reply()
(work / "r.eml").write_bytes(raw.replace(b"\r\n", b"\n"))
sink_port, port, mport = e2e.free_port(), e2e.free_port(), e2e.free_port()
if sys.argv[2] == "tls":
    import os
    os.chmod(work, 0o755)  # the private Postfix sink reads its certificates as postfix
    relay = e2e.Relay(work, port, sink_port, mport, tls=True)
    c = relay.certs
    ca, cc, ck = c / "ca.crt", c / "tenants" / "contoso.crt", c / "tenants" / "contoso.key"
    sink = e2e.Postfix(work, "tls-sink", sink_port, 0, tls=e2e.TlsFiles(c / "sink.crt", c / "sink.key", ca, cc, ck),
                       discard=True)
    sink.start()
    try:
        e2e.measure_lg("relay", port, work / "r.eml", "10", 300, 20, 1, None, None, ca)
        runs = [e2e.measure_lg("relay", port, work / "r.eml", "10", 1500, 20, 1, relay.pids, None, ca)
                for _ in range(3)]
        print(f"{1000 * min(r.cpu / r.n for r in runs):.3f} {max(r.rate for r in runs):.1f}")
    finally:
        relay.stop(); sink.stop()
    raise SystemExit(0)
if sys.argv[2] == "mix":  # this tree's loadgen (it sends a directory in turn) and mix, whatever the tree
    e2e.LOADGEN, mixdir = Path(sys.argv[3]), Path(sys.argv[4])
    n = 3 * len(list(mixdir.glob("*.eml")))
    sink = e2e.Sink(sink_port); relay = e2e.Relay(work, port, sink_port, mport)
    try:
        e2e.measure_lg("relay", port, mixdir, "mix", 300, 20, 1, None, lambda: sink.count, None)
        runs = [e2e.measure_lg("relay", port, mixdir, "mix", n, 20, 1, relay.pids, lambda: sink.count, None)
                for _ in range(3)]
        if not all(r.complete for r in runs):
            raise SystemExit("mix: a run was incomplete (a message refused or lost)")
        print(f"{1000 * min(r.cpu / r.n for r in runs):.3f} {max(r.rate for r in runs):.1f}")
    finally:
        relay.stop(); sink.stop()
    raise SystemExit(0)
sink = e2e.Sink(sink_port); relay = e2e.Relay(work, port, sink_port, mport)
if big:
    e2e.measure("relay", port, sink, work / "r.eml", "25", 1, 1, 1, relay.pids, 120)
    runs = [e2e.measure("relay", port, sink, work / "r.eml", "25", 4, 1, 1, relay.pids, 300) for _ in range(3)]
else:
    e2e.measure("relay", port, sink, work / "r.eml", "10", 500, 20, 1, relay.pids, 60)
    runs = [e2e.measure("relay", port, sink, work / "r.eml", "10", 3000, 20, 1, relay.pids, 120) for _ in range(3)]
best = min(r.cpu / r.n for r in runs)
print(f"{1000*best:.3f} {max(r.rate for r in runs) * len(raw) / 1e6:.1f}")
relay.stop(); sink.stop()
'''
with checkout(rev, "relay-ab-") as wt:
    mode = ["big" if big else "tls" if tls else "mix" if mix else "file" if exo or html else "small"]
    # This tree's messages, built once, the same files for both trees.
    sys.path.insert(0, str(HERE))
    import e2e
    import run

    if exo or html:
        message = run.outlook_reply_from_exchange_online() if exo else e2e.html_with_images()
        (wt.parent / "message.eml").write_bytes(message)
        mode.append(str(wt.parent / "message.eml"))
    if mix:
        mixdir = wt.parent / "mix"
        used, left_out = e2e.real_mail_mix(mixdir)
        mode += [str(HERE / "loadgen.py"), str(mixdir)]
    res: dict[str, list[float]] = {"base": [], "this": []}
    rate: dict[str, list[float]] = {"base": [], "this": []}
    for _ in range(3):
        for name, root in (("base", wt), ("this", REPO)):
            env = dict(os.environ, PYTHONPATH=str(root))
            out = subprocess.run([sys.executable, "-c", child, str(root), *mode],
                                 capture_output=True, text=True, env=env, timeout=900, check=True)
            cpu, mbs = map(float, out.stdout.strip().splitlines()[-1].split())
            res[name].append(cpu)
            rate[name].append(mbs)
            print(name, cpu, "ms", mbs, "MB/s" if big else "msg/s" if tls or mix else "", flush=True)
b, t = min(res["base"]), min(res["this"])


def with_rate(what: str, unit: str, digits: int) -> str:
    """The report line for a mode that also measures a rate (best round of each tree)."""
    rb, rt = max(rate["base"]), max(rate["this"])
    return (f"{what}, same run, 3 alternating rounds: base {rev} {b:.{digits}f} ms at {rb:.1f} {unit}, this tree "
            f"{t:.{digits}f} ms at {rt:.1f} {unit}; CPU this/base = {t / b:.3f}, {unit} this/base = {rt / rb:.3f}")


if big:
    line = with_rate("relay CPU per 25 MB-attachment message (one session, messages one after another, plaintext "
                     "profile)", "MB/s", 1)
elif tls:
    line = with_rate("relay CPU per 10 KB message over STARTTLS on both sides (loadgen.py, 20 sessions, one per "
                     "connection, into a Postfix TLS sink that discards)", "msg/s", 3)
elif mix:
    line = with_rate(f"relay CPU per message of the real-mail mix ({used} messages of the public corpora in "
                     f"tests/data, {left_out} left out; loadgen.py, plaintext, 20 sessions, one per connection, into "
                     f"smtp-sink)", "msg/s", 3)
elif html:
    line = (f"relay CPU per 200 KB HTML message with inline images (e2e.html_with_images), smtp-source, 20 sessions, "
            f"one per connection, plaintext profile, same run, 3 alternating rounds: base {rev} {b:.3f} ms, this tree "
            f"{t:.3f} ms; this/base = {t / b:.3f}")
elif exo:
    line = (f"relay CPU per 10 KB reply with the header section Exchange Online hands a connector (58 fields, "
            f"12 KB; tests/exo_mail.py), smtp-source, 20 sessions, one per connection, plaintext profile, same run, "
            f"3 alternating rounds: base {rev} {b:.3f} ms, this tree {t:.3f} ms; this/base = {t / b:.3f}")
else:
    line = (f"relay CPU per 10 KB message (smtp-source, 20 sessions, one per connection, plaintext profile), "
            f"same run, 3 alternating rounds: base {rev} {b:.3f} ms, this tree {t:.3f} ms; this/base = {t / b:.3f}")
print(line)
(HERE / ("results-relay-ab-big.txt" if big else "results-relay-ab-tls.txt" if tls else
          "results-relay-ab-mix.txt" if mix else "results-relay-ab-exo.txt" if exo else
          "results-relay-ab-html.txt" if html else "results-relay-ab.txt")
 ).write_text(line + "\n")
