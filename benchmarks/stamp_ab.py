"""A/B: stamping cost of this tree against another revision, measured in the same run.

    .venv/bin/python benchmarks/stamp_ab.py [--base REV] [--rounds 6] [--replies-only]

The base revision is checked out into a temporary git worktree; child processes alternate
between the two trees (A B A B ...) so drift on a noisy machine hits both alike. Each child times
``pipeline.process`` on the same messages and reports, per message, its best batch: the 10 KB
Outlook reply of ``run.py``, the same with the header section Exchange Online hands a connector
(tests/exo_mail.py), and every message of the public corpora in tests/data (the reply
corpus, and the mail-parser, flufl.bounce and CPython test messages: licences in their
READMEs), which is real mail nobody on this team wrote. The report gives the 10 KB reply, the
distribution of per-message cost in each tree, the time for one pass over the corpora, and the
messages whose cost changed most. Writes benchmarks/results-stamp-ab.txt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from worktree import checkout

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from relay import pipeline
from relay.mime.stamper import Signature
SIG = Signature(html='<p style="margin:0"><b>Alice Wilber</b> · Sales Director · Contoso Ltd.</p>',
                text="Alice Wilber · Sales Director · Contoso Ltd.")
REC = b"Received: from x ([127.0.0.1])\r\n\tby relay.test; Sat, 1 Jan 2022 00:00:00 +0000\r\n"
out = {}
budget = float(sys.argv[3])
for name, path in json.loads(sys.argv[2]).items():
    raw = open(path, "rb").read()
    fn = lambda: pipeline.process(raw, processed_header="X-CodeTwoProcessed", received=REC, signature=SIG,
                                  mail_from="alice@contoso.com")
    try:
        fn()
    except Exception:  # refused by this tree (e.g. a header over the limits): not comparable
        continue
    best = float("inf")
    t_end = time.perf_counter() + budget
    while True:
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        best = min(best, (time.perf_counter() - t0) / 5)
        if time.perf_counter() >= t_end:
            break
    out[name] = best
print(json.dumps(out))
"""


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="83a1509", help="revision to compare against (default: before issue #9)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--budget", type=float, default=0.01, help="seconds per message per child (default 0.01)")
    ap.add_argument("--replies-only", action="store_true", help="the reply corpus only, not the other corpora")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import run  # the same 10 KB message as make bench

    results: dict[str, dict[str, list[float]]] = {"base": {}, "this": {}}
    with checkout(args.base, "stamp-ab-") as base:
        tmp = base.parent  # the worktree's temporary directory, gone with it
        k, kx = "10 KB Outlook reply", "the same with Exchange Online's header section (58 fields, 12 KB)"
        msgs = {k: tmp / "reply10k.eml", kx: tmp / "reply10k-exo.eml"}
        msgs[k].write_bytes(run.outlook_reply())
        msgs[kx].write_bytes(run.outlook_reply_from_exchange_online())
        data = REPO / "tests" / "data"
        roots = [data / "replies"] + ([] if args.replies_only else [data / "corpus"])
        for root in roots:
            for r in sorted(root.rglob("*.eml")):
                msgs[str(r.relative_to(data))] = r
        for i in range(args.rounds):
            for label, tree in (("base", base), ("this", REPO)):
                got = json.loads(subprocess.run(
                    [sys.executable, "-c", CHILD, str(tree), json.dumps({n: str(v) for n, v in msgs.items()}),
                     str(args.budget)], check=True, capture_output=True, text=True).stdout)
                for n, v in got.items():
                    results[label].setdefault(n, []).append(v)
            print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    rows = [f"stamp A/B, same run, {args.rounds} alternating rounds; base = {args.base}, this = working tree; "
            f"per message the best batch of each tree"]
    for key in (k, kx):
        b, t = min(results["base"][key]), min(results["this"][key])
        bm, tm = statistics.median(results["base"][key]), statistics.median(results["this"][key])
        rows.append(f"{key}: base {b * 1e6:,.0f} µs best (median of rounds {bm * 1e6:,.0f}),"
                    f" this {t * 1e6:,.0f} µs best (median {tm * 1e6:,.0f}); this/base = {t / b:.3f}")
    both = [n for n in results["this"] if n not in (k, kx) and n in results["base"]]
    if both:
        bb = {n: min(results["base"][n]) for n in both}
        tt = {n: min(results["this"][n]) for n in both}
        ratios = sorted(tt[n] / bb[n] for n in both)
        rows.append(f"{len(both)} corpus messages (stamped by both trees): one pass over all of them base "
                    f"{sum(bb.values()) * 1e3:,.1f} ms, this {sum(tt.values()) * 1e3:,.1f} ms; "
                    f"this/base = {sum(tt.values()) / sum(bb.values()):.3f}")
        for label, d in (("base", bb), ("this", tt)):
            xs = list(d.values())
            rows.append(f"  {label}: per message p50 {_pct(xs, 0.5) * 1e6:,.0f} µs, p90 {_pct(xs, 0.9) * 1e6:,.0f},"
                        f" p99 {_pct(xs, 0.99) * 1e6:,.0f}, max {max(xs) * 1e6:,.0f}")
        rows.append(f"  per-message this/base: median {statistics.median(ratios):.3f}, "
                    f"10th percentile {_pct(ratios, 0.1):.3f}, max {max(ratios):.3f}")
        rows.append("  largest changes (µs, base → this):")
        for n in sorted(both, key=lambda n: tt[n] - bb[n])[:6] + sorted(both, key=lambda n: tt[n] - bb[n])[-2:]:
            rows.append(f"    {n}: {bb[n] * 1e6:,.0f} → {tt[n] * 1e6:,.0f} ({tt[n] / bb[n]:.2f})")
    out = "\n".join(rows)
    print(out)
    (HERE / "results-stamp-ab.txt").write_text(out + "\n")


if __name__ == "__main__":
    main()
