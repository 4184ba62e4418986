"""What ``signature-relay queue`` does to the spool: list, show, retry, hold, release, delete,
stats. Plain file operations with the spool's own atomic writes, safe while the relay runs: the
running relay's rescan (``delivery.rescan_interval``) notices a retry, a hold, a release or a
delete. Blocking; no network.

An entry being attempted at that very moment finishes its attempt first: a hold or delete then
takes effect for what is left (the runner never rewrites metadata whose message file is gone).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

from relay.delivery.spool import Entry, Spool, load_entry


class NotInSpool(LookupError):
    """No entry with that id (queued or held)."""


@dataclass(frozen=True)
class Item:
    entry: Entry
    state: str  # "queued" | "held"
    size: int
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self.entry), "state": self.state, "size": self.size, "reason": self.reason}


def _items_in(d: Path, state: str) -> list[Item]:
    out: list[Item] = []
    if not d.exists():
        return out
    for meta in sorted(d.glob("*.json")):
        eml = d / f"{meta.stem}.eml"
        try:
            e = load_entry(meta)
            size = eml.stat().st_size
        except (ValueError, TypeError, OSError):
            continue  # being written or removed right now, or for the quarantine at the next start
        reason_file = d / f"{meta.stem}.reason"
        reason = reason_file.read_text("utf-8", "replace").strip() if reason_file.exists() else ""
        out.append(Item(e, state, size, reason))
    return out


def items(spool: Spool) -> list[Item]:
    return _items_in(spool.root, "queued") + _items_in(spool.held, "held")


def find(spool: Spool, eid: str) -> Item:
    for it in items(spool):
        if it.entry.id == eid:
            return it
    raise NotInSpool(eid)


def headers(spool: Spool, item: Item) -> list[tuple[str, str]]:
    d = spool.root if item.state == "queued" else spool.held
    with (d / f"{item.entry.id}.eml").open("rb") as f:
        msg = BytesHeaderParser(policy=compat32).parse(f)
    return [(k, str(v)) for k, v in msg.items() if k.lower() in ("from", "to", "cc", "subject", "date", "message-id")]


def retry(spool: Spool, eid: str) -> Item:
    """Make a queued entry due now (the running relay attempts it at its next rescan)."""
    it = find(spool, eid)
    if it.state != "queued":
        raise ValueError(f"{eid} is held: `queue release {eid}` first")
    e = it.entry
    e.next_attempt = time.time()
    if not spool.update(e):
        raise NotInSpool(eid)
    return it


def hold(spool: Spool, eid: str, reason: str = "held by an operator") -> Item:
    it = find(spool, eid)
    if it.state == "held":
        return it
    spool.hold(it.entry, reason)
    return Item(it.entry, "held", it.size, reason)


def release(spool: Spool, eid: str) -> Item:
    it = find(spool, eid)
    if it.state != "held":
        return it
    e = spool.release(eid)
    e.next_attempt = time.time()  # due now; the runner's fault count starts afresh
    spool.update(e)
    return Item(e, "queued", it.size)


def delete(spool: Spool, eid: str) -> Item:
    it = find(spool, eid)
    d = spool.root if it.state == "queued" else spool.held
    # Metadata first (as the runner does): a crash in between leaves an uncommitted .eml, removed at start.
    for suffix in (".json", ".eml", ".reason"):
        (d / f"{eid}{suffix}").unlink(missing_ok=True)
    return it


def stats(spool: Spool) -> dict[str, Any]:
    all_items = items(spool)
    now = time.time()
    queued = [i for i in all_items if i.state == "queued"]
    by_tenant: dict[str, int] = {}
    for i in queued:
        by_tenant[i.entry.tenant] = by_tenant.get(i.entry.tenant, 0) + 1
    quarantined = len(list(spool.quarantine.glob("*.reason"))) if spool.quarantine.exists() else 0
    return {
        "spool": str(spool.root), "queued": len(queued), "held": len(all_items) - len(queued),
        "quarantined": quarantined, "bytes": sum(i.size for i in all_items),
        "oldest_seconds": round(now - min((i.entry.created for i in queued), default=now)),
        "due_now": sum(1 for i in queued if i.entry.next_attempt <= now), "by_tenant": by_tenant,
    }
