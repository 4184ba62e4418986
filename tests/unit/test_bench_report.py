"""The end-to-end benchmark's report arithmetic (benchmarks/e2e.py): each figure's ratio to the
baselines of the same run comes from the right runs and the right way round (issue #14)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import e2e  # type: ignore[import-not-found]  # noqa: E402  (benchmarks/ is no package; not type-checked here)


def run(system: str, rate: float, cpu_ms: float, per_conn: int = 1, message: str = "10 KB reply") -> e2e.Run:
    n = 1000
    return e2e.Run(system, message, per_conn, 20, n, n / rate, cpu_ms * n / 1000, 0.0, True)


RUNS = [
    run("direct", 5000, 0), run("postfix", 800, 2.0), run("altermime", 200, 10.0),
    run("relay", 900, 1.0), run("relay ×2", 1200, 1.5),
    # a slower repetition of the relay: the table takes each system's best (least disturbed) one
    run("relay", 600, 3.0),
]


def test_cpu_table_divides_the_best_runs_cpu_by_each_baselines() -> None:
    lines = e2e.cpu_table(RUNS, ["10 KB reply"])
    assert lines[0].startswith("| message | connection | relay ÷ Postfix | relay ÷ Postfix + alterMIME")
    assert lines[2] == "| 10 KB reply | one message | 0.50 | 0.10 | 0.75 | 0.15 |"
    assert len(lines) == 3  # no "many messages" runs, no row for them


def test_throughput_table_ratios_match_the_cpu_tables_runs() -> None:
    row = e2e.table(RUNS, ["10 KB reply"])[2]
    # relay ÷ alterMIME, relay ÷ Postfix, 2 workers ÷ alterMIME, 2 workers ÷ Postfix
    assert row.endswith("| 4.50 | 1.12 | 6.00 | 1.50 |")
    assert "900.0 msg/s (1.00 ms CPU)" in row


def test_a_row_with_a_baseline_missing_its_cpu_is_left_out() -> None:
    runs = [r for r in RUNS if r.system != "altermime"] + [run("altermime", 200, 0)]
    assert len(e2e.cpu_table(runs, ["10 KB reply"])) == 2


def test_targets_list_the_msg_rate_ones_then_what_the_open_loop_and_big_messages_wrote() -> None:
    lines = e2e.targets(RUNS, "plaintext")
    assert "- ≥ 1.5 × Postfix plain relay: 1.12 × / 1.50 ×" in lines
    assert "- relay CPU ≤ 1.5 ms per message: 1.00 ms / 1.50 ms" in lines
    assert not any("latency and big messages" in x for x in lines)
    more = e2e.targets(RUNS, "plaintext", ["p99 added ≤ 10 ms …: +2.6 ms / +42.1 ms"])
    assert more[:len(lines)] == lines
    assert more[len(lines):] == ["", "Targets (issue #14), plaintext, latency and big messages (1 worker unless it "
                                 "says):", "", "- p99 added ≤ 10 ms …: +2.6 ms / +42.1 ms"]
