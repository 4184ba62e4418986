"""A/B: stamping cost of this tree against another revision, measured in the same run.

    .venv/bin/python benchmarks/stamp_ab.py [--base REV] [--rounds 6]

The base revision is checked out into a temporary git worktree; child processes alternate
between the two trees (A B A B ...) so drift on a noisy machine hits both alike. Each child times
``pipeline.process`` on the same messages (the 10 KB Outlook reply of ``run.py``, plus real
replies from tests/data/replies when present) and reports its best batch. Writes
benchmarks/results-stamp-ab.txt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

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
for name, path in json.loads(sys.argv[2]).items():
    raw = open(path, "rb").read()
    fn = lambda: pipeline.process(raw, processed_header="X-CodeTwoProcessed", received=REC, signature=SIG,
                                  mail_from="alice@contoso.com")
    fn()
    best = float("inf")
    t_end = time.perf_counter() + float(sys.argv[3])
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        best = min(best, (time.perf_counter() - t0) / 20)
    out[name] = best
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="83a1509", help="revision to compare against (default: before issue #9)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per message per child")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import run  # the same 10 KB message as make bench

    tmp = Path(tempfile.mkdtemp(prefix="stamp-ab-"))
    msgs = {"10 KB Outlook reply": tmp / "reply10k.eml"}
    msgs["10 KB Outlook reply"].write_bytes(run.outlook_reply())
    replies = sorted((REPO / "tests" / "data" / "replies").rglob("*.eml"))[:40]
    if replies:
        corpus = tmp / "replies"
        corpus.mkdir()
        for i, r in enumerate(replies):
            msgs[f"reply corpus #{i}"] = r
    base = tmp / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base), args.base], check=True)
    try:
        results: dict[str, dict[str, list[float]]] = {"base": {}, "this": {}}
        for _ in range(args.rounds):
            for label, tree in (("base", base), ("this", REPO)):
                got = json.loads(subprocess.run(
                    [sys.executable, "-c", CHILD, str(tree), json.dumps({k: str(v) for k, v in msgs.items()}),
                     str(args.budget / max(1, len(msgs)) if len(msgs) > 1 else args.budget)],
                    check=True, capture_output=True, text=True).stdout)
                for k, v in got.items():
                    results[label].setdefault(k, []).append(v)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    rows = [f"stamp A/B, same run, {args.rounds} alternating rounds; base = {args.base}, this = working tree"]
    k = "10 KB Outlook reply"
    b, t = min(results["base"][k]), min(results["this"][k])
    bm, tm = statistics.median(results["base"][k]), statistics.median(results["this"][k])
    rows.append(f"{k}: base {b * 1e6:,.0f} µs best (median of rounds {bm * 1e6:,.0f}),"
                f" this {t * 1e6:,.0f} µs best (median {tm * 1e6:,.0f}); this/base = {t / b:.3f}")
    others = [x for x in results["this"] if x != k]
    if others:
        ratios = [min(results["this"][x]) / min(results["base"][x]) for x in others]
        rows.append(f"{len(others)} real replies: this/base per message median {statistics.median(ratios):.3f}, "
                    f"max {max(ratios):.3f}")
    out = "\n".join(rows)
    print(out)
    (HERE / "results-stamp-ab.txt").write_text(out + "\n")


if __name__ == "__main__":
    main()
