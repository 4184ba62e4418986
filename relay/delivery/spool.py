"""The durable spool of queue mode: 250 means the message is on disk.

Each queued copy is two files in one directory: ``<id>.eml`` (the bytes to deliver) and
``<id>.json`` (envelope, tenant, attempts, next attempt). Each is written to a temporary name,
fsync'd and renamed; the directory is fsync'd after the rename of the ``.json``, which is the
commit point (RFC 5321 §6.1: once we say 250 we are responsible). On start, an ``.eml`` without its
``.json`` is the remains of a crash before the 250 and is removed; the client retried.

Blocking on purpose: callers run these functions in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class Entry:
    id: str
    tenant: str
    mail_from: str
    rcpts: list[str]
    smtputf8: bool
    created: float
    next_attempt: float
    attempts: int = 0
    last_error: str = ""


_ENTRY_FIELDS = frozenset(f.name for f in fields(Entry))


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root

    def prepare(self) -> list[Entry]:
        """Create the directory, drop uncommitted leftovers, return the committed entries."""
        self.root.mkdir(parents=True, exist_ok=True)
        for tmp in self.root.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        entries = []
        for meta in sorted(self.root.glob("*.json")):
            try:
                data = json.loads(meta.read_text("utf-8"))
                # Keys this version does not know (e.g. "refused", written empty by 0.1.0 and
                # never read) are ignored, so an upgrade never strands spooled mail.
                e = Entry(**{k: v for k, v in data.items() if k in _ENTRY_FIELDS})
            except (ValueError, TypeError, OSError):
                meta.rename(meta.with_suffix(".json.corrupt"))  # kept for an operator, never lost
                continue
            if (self.root / f"{e.id}.eml").exists():
                entries.append(e)
        committed = {e.id for e in entries}
        for eml in self.root.glob("*.eml"):
            if eml.stem not in committed and not (self.root / f"{eml.stem}.json.corrupt").exists():
                eml.unlink()  # written before a crash, never acknowledged with 250
        return entries

    def put(self, entry: Entry, data: bytes) -> None:
        """Durably store one copy. Raises OSError (ENOSPC, EIO...): the caller answers 4xx."""
        _write(self.root / f"{entry.id}.eml", data)
        _write(self.root / f"{entry.id}.json", json.dumps(asdict(entry)).encode())
        _fsync_dir(self.root)

    def update(self, entry: Entry) -> None:
        _write(self.root / f"{entry.id}.json", json.dumps(asdict(entry)).encode())

    def data(self, entry: Entry) -> bytes:
        return (self.root / f"{entry.id}.eml").read_bytes()

    def remove(self, entry: Entry) -> None:
        # Metadata first: a crash in between leaves an uncommitted .eml, removed at the next start.
        (self.root / f"{entry.id}.json").unlink(missing_ok=True)
        (self.root / f"{entry.id}.eml").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            _fsync_dir(self.root)


def backoff(attempts: int, lo: float, hi: float) -> float:
    """Delay before the next attempt: lo, 2·lo, 4·lo… capped at hi (Postfix's queue manager)."""
    return float(min(hi, lo * (2 ** max(0, attempts - 1))))


def now() -> float:
    return time.time()
