"""The durable spool of queue mode: 250 means the message is on disk.

Each queued copy is two files in one directory: ``<id>.eml`` (the bytes to deliver) and
``<id>.json`` (envelope, tenant, attempts, next attempt). Each is written to a temporary name,
fsync'd and renamed; the directory is fsync'd after the rename of the ``.json``, which is the
commit point (RFC 5321 §6.1: once we say 250 we are responsible). On start, an ``.eml`` without its
``.json`` is the remains of a crash before the 250 and is removed; the client retried.

Two side directories keep what must not be retried blindly and must never be lost:
``quarantine/`` receives files that cannot be read at start (corrupt metadata; a log line names
them), ``hold/`` receives entries an operator must look at (repeated unexpected failures), each
with a ``.reason`` file. Nothing is ever deleted from them by the relay.

Blocking on purpose: callers run these functions in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from relay.atomicfile import fsync_dir, write_atomic


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
log = logging.getLogger("relay.queue")


class SpoolFull(OSError):
    """Less free space than ``min_free`` on the spool's filesystem: refuse before it is full."""

    def __init__(self, free: int, wanted: int) -> None:
        super().__init__(errno.ENOSPC, f"{free} bytes free, below the {wanted}-byte minimum")


def load_entry(meta: Path) -> Entry:
    data = json.loads(meta.read_text("utf-8"))
    # Keys this version does not know (e.g. "refused", written empty by 0.1.0 and never read)
    # are ignored, so an upgrade never strands spooled mail.
    e = Entry(**{k: v for k, v in data.items() if k in _ENTRY_FIELDS})
    if e.id != meta.stem:
        raise ValueError(f"id {e.id!r} does not match the file name")
    return e


class Spool:
    def __init__(self, root: Path, min_free: int = 0) -> None:
        self.root = root
        self.quarantine = root / "quarantine"
        self.held = root / "hold"
        self.min_free = min_free
        self._seen: dict[str, int] = {}  # metadata mtimes at the last scan

    def prepare(self) -> list[Entry]:
        """Create the directory, drop uncommitted leftovers, move unreadable entries to
        ``quarantine/``, return the committed entries. Never raises for a bad file: a crash loop
        at start would stop every other message too."""
        self.root.mkdir(parents=True, exist_ok=True)
        for tmp in self.root.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for old in self.root.glob("*.json.corrupt"):  # set aside in place by 0.1.x
            self.quarantine.mkdir(exist_ok=True)
            os.replace(old, self.quarantine / f"{old.name.removesuffix('.corrupt')}")
            self._set_aside(old.name.removesuffix(".json.corrupt"), self.quarantine, "unreadable metadata (0.1.x)")
        entries = []
        for meta in sorted(self.root.glob("*.json")):
            try:
                e = load_entry(meta)
            except (ValueError, TypeError, OSError) as err:
                self._set_aside(meta.stem, self.quarantine, f"unreadable metadata: {err}")
                continue
            if (self.root / f"{e.id}.eml").exists():
                entries.append(e)
            else:
                self._set_aside(e.id, self.quarantine, "metadata without its message file")
        committed = {e.id for e in entries}
        for eml in self.root.glob("*.eml"):
            # Written before a crash, never acknowledged with 250 -- unless `queue release` is
            # moving it back from hold/ right now (message first, metadata last).
            if eml.stem not in committed and not (self.held / f"{eml.stem}.json").exists():
                eml.unlink()
        return entries

    def scan(self) -> tuple[list[Entry], set[str]]:
        """The periodic rescan: (committed entries new or changed since the last scan, ids of all
        committed entries). Reads only metadata whose mtime changed, so it stays cheap on a long
        queue; an operator's ``queue retry`` or ``delete`` is seen here. Leaves everything else
        alone: a ``.eml`` without its ``.json`` may be a copy being written right now."""
        changed, present = [], set()
        seen: dict[str, int] = {}
        for meta in self.root.glob("*.json"):
            eid = meta.stem
            try:
                mtime = meta.stat().st_mtime_ns
            except OSError:
                continue  # removed since the listing
            if not (self.root / f"{eid}.eml").exists():
                continue
            present.add(eid)
            seen[eid] = mtime
            if self._seen.get(eid) == mtime:
                continue
            try:
                changed.append(load_entry(meta))
            except (ValueError, TypeError, OSError) as err:
                log.warning("queue: rescan skipped %s: %s", meta.name, err)
        self._seen = seen
        return changed, present

    def hold(self, entry: Entry, reason: str) -> None:
        """Move an entry to ``hold/`` (kept, not retried) with the reason beside it."""
        self._set_aside(entry.id, self.held, reason)

    def release(self, eid: str) -> Entry:
        """Move a held entry back into the spool; the caller schedules it."""
        meta = self.held / f"{eid}.json"
        e = load_entry(meta)
        os.replace(self.held / f"{eid}.eml", self.root / f"{eid}.eml")
        os.replace(meta, self.root / f"{eid}.json")
        (self.held / f"{eid}.reason").unlink(missing_ok=True)
        fsync_dir(self.root)
        return e

    def _set_aside(self, eid: str, where: Path, reason: str) -> None:
        where.mkdir(exist_ok=True)
        for suffix in (".eml", ".json"):  # message first: a crash in between leaves a .json alone (quarantined)
            src = self.root / f"{eid}{suffix}"
            if src.exists():
                os.replace(src, where / src.name)
        write_atomic(where / f"{eid}.reason", (reason + "\n").encode("utf-8", "replace"))
        fsync_dir(where)
        fsync_dir(self.root)
        log.error("queue %s: moved to %s/: %s", eid, where.name, reason)

    def check_space(self) -> None:
        """Raise :class:`SpoolFull` when the spool's filesystem is below ``min_free`` (452 before
        the disk is actually full, so nothing is ever half-written for want of space)."""
        if self.min_free <= 0:
            return
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if free < self.min_free:
            raise SpoolFull(free, self.min_free)

    def put(self, entry: Entry, data: bytes) -> None:
        """Durably store one copy. Raises OSError (ENOSPC, EIO...): the caller answers 4xx."""
        self.check_space()
        write_atomic(self.root / f"{entry.id}.eml", data)
        write_atomic(self.root / f"{entry.id}.json", json.dumps(asdict(entry)).encode())
        fsync_dir(self.root)

    def update(self, entry: Entry) -> bool:
        """Rewrite an entry's metadata; False (and nothing written) when an operator removed or
        held it meanwhile, so a deleted entry is never brought back as metadata alone."""
        if not (self.root / f"{entry.id}.eml").exists():
            return False
        write_atomic(self.root / f"{entry.id}.json", json.dumps(asdict(entry)).encode())
        return True

    def data(self, entry: Entry) -> bytes:
        return (self.root / f"{entry.id}.eml").read_bytes()

    def remove(self, entry: Entry) -> None:
        # Metadata first: a crash in between leaves an uncommitted .eml, removed at the next start.
        (self.root / f"{entry.id}.json").unlink(missing_ok=True)
        (self.root / f"{entry.id}.eml").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            fsync_dir(self.root)


def backoff(attempts: int, lo: float, hi: float) -> float:
    """Delay before the next attempt: lo, 2·lo, 4·lo… capped at hi (Postfix's queue manager)."""
    return float(min(hi, lo * (2 ** max(0, attempts - 1))))


def now() -> float:
    return time.time()
