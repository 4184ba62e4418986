"""Issue #12: the chaos benchmark's smoke run is part of `make test` — 300 messages from 8 clients
while the relay is SIGKILLed and restarted, then a spool that fills up. No 250 may be lost, and a
full spool must answer 452. (The full run is `benchmarks/chaos.py`; its figures are in the note.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_chaos_smoke_run_loses_nothing(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--quick", "--seed", "7",
                        "--out", str(tmp_path / "chaos.txt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "RESULT: no 250 was lost" in r.stdout, out[-3000:]
    assert "lost=0" in r.stdout and "452:" in r.stdout, out[-3000:]
