"""The base tree of the same-run A/B benchmarks (plan_ab, relay_ab, stamp_ab, wan_ab, workers_ab):
REV checked out into a temporary git worktree, removed (with its temporary directory) afterwards."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def checkout(rev: str, prefix: str = "ab-") -> Iterator[Path]:
    """A detached worktree of ``rev``, for as long as the ``with`` block runs."""
    wt = Path(tempfile.mkdtemp(prefix=prefix)) / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(wt), rev], check=True)
    try:
        yield wt
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], capture_output=True,
                       check=False)
        shutil.rmtree(wt.parent, ignore_errors=True)
