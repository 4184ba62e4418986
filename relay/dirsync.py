"""``signature-relay directory sync``: a tenant's directory from Microsoft Entra ID (Graph).

* **Delta queries** for users and groups (learn.microsoft.com/graph/delta-query-users,
  .../delta-query-groups): the first run reads everything, later runs only what changed since the
  stored ``@odata.deltaLink``; an expired link (:class:`~relay.graph.ResyncRequired`) starts over.
  ``state.json`` keeps what Graph said (users and groups by object id) and the links.
* **Users** with ``$select`` of exactly the attributes templates may use (the file source's
  ``ATTRIBUTES``; ``onPremisesExtensionAttributes`` becomes ``extensionAttribute1``–``15``),
  plus ``accountEnabled``. A delta answer for a changed user carries at least the changed
  properties (delta-query-overview: "at least"), so values are merged, never replaced whole;
  ``@removed`` drops the user.
* **Groups** and their members from ``members@delta`` (spread over several pages and objects for
  one group; ``@removed`` entries drop a member). Nested groups stay nested (``group:<name>``) and
  the file source resolves them transitively.
* **Photos** at one size (``/users/{id}/photos/{size}``, profilephoto-get), fetched again only
  when the ``@odata.mediaEtag`` changed; a user without one (404) has none.
* **Safe swap.** The snapshot is written in the file source's own model (``directory.csv``,
  ``groups.toml``, ``photos/``) into a new folder (files fsync'd), loaded and checked the way
  ``signature-relay check`` does (every template renders for every user), and only then made
  ``current`` by an atomic rename of a symlink. A sync that fails, or whose user count drops by
  more than ``max_drop``, keeps the old snapshot, its state and its delta links, and says why.

Who is in the snapshot: every user with a ``mail`` whose account is enabled, members and guests
alike (``userType`` is kept: a guest is never treated as internal, because internal is decided by
the tenant's accepted domains, and a guest's address is not in them). Mail contacts are not users
in Graph and never appear.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.atomicfile import fsync_dir, write_atomic
from relay.directory import ATTRIBUTES, DirectoryError
from relay.graph import Graph, ResyncRequired

STATE_VERSION = 1
# Graph user properties read; everything a template may use (relay.directory.ATTRIBUTES).
_GRAPH_ONLY = ("photo", *(f"extensionAttribute{i}" for i in range(1, 16)))
USER_SELECT = (
    "id", *(a for a in ATTRIBUTES if a not in _GRAPH_ONLY), "onPremisesExtensionAttributes", "accountEnabled",
)
GROUP_SELECT = ("id", "displayName", "mail", "groupTypes", "members")
_USER_T = "#microsoft.graph.user"
_GROUP_T = "#microsoft.graph.group"

Log = Callable[[str], None]


class SyncRefused(Exception):
    """A sync that must not replace the current snapshot (kept as it is)."""


@dataclass
class State:
    users: dict[str, dict[str, Any]] = field(default_factory=dict)  # object id → Graph properties
    # object id → {displayName, mail, groupTypes, members}
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    user_link: str = ""
    group_link: str = ""
    photos: dict[str, str] = field(default_factory=dict)  # user id → mediaEtag of the stored photo
    synced_at: float = 0.0
    snapshot_users: int = 0

    @classmethod
    def load(cls, path: Path) -> State:
        if not path.exists():
            return cls()
        data = json.loads(path.read_text("utf-8"))
        if data.get("version") != STATE_VERSION:
            return cls()  # another format: start over with a full sync
        return cls(**{k: v for k, v in data.items() if k != "version"})

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps({"version": STATE_VERSION, **self.__dict__}, separators=(",", ":")).encode())


@dataclass
class Result:
    full: bool
    users_changed: int
    groups_changed: int
    photos_fetched: int
    users: int
    groups: int
    requests: int
    seconds: float
    snapshot: Path


# --- merging delta answers (pure) ------------------------------------------------------------------


def _apply(coll: dict[str, dict[str, Any]], changes: Iterable[dict[str, Any]],
           merge: Callable[[dict[str, Any], dict[str, Any]], None]) -> int:
    """Apply one delta page to ``coll`` (object id → properties): ``@removed`` drops the object,
    anything else is merged into it by ``merge``. Returns how many entries the page had."""
    n = 0
    for c in changes:
        oid = c.get("id")
        if not oid:
            continue
        n += 1
        if "@removed" in c:
            coll.pop(oid, None)
        else:
            merge(coll.setdefault(oid, {}), c)
    return n


def apply_users(users: dict[str, dict[str, Any]], changes: Iterable[dict[str, Any]]) -> int:
    def merge(cur: dict[str, Any], c: dict[str, Any]) -> None:
        cur.update({k: v for k, v in c.items() if not k.startswith("@")})  # only what this answer carries

    return _apply(users, changes, merge)


def apply_groups(groups: dict[str, dict[str, Any]], changes: Iterable[dict[str, Any]]) -> int:
    def merge(cur: dict[str, Any], c: dict[str, Any]) -> None:
        cur.update({k: v for k, v in c.items() if not k.startswith("@") and k != "members@delta"})
        members = dict.fromkeys(cur.get("members", []))
        for m in c.get("members@delta", []):
            key = f"{'group' if m.get('@odata.type') == _GROUP_T else 'user'}:{m.get('id')}"
            if "@removed" in m:
                members.pop(key, None)
            else:
                members[key] = None
        cur["members"] = list(members)

    return _apply(groups, changes, merge)


def user_row(u: dict[str, Any]) -> dict[str, str] | None:
    """A directory.csv row for a Graph user, or None when the user has no mailbox address or the
    account is disabled (it cannot send mail)."""
    mail = str(u.get("mail") or "").strip().lower()
    if not mail or u.get("accountEnabled") is False:
        return None
    row: dict[str, str] = {}
    for a in ATTRIBUTES:
        v = u.get(a)
        if isinstance(v, list):
            v = ";".join(str(x) for x in v)  # the file source splits multi-valued columns on ";"
        row[a] = "" if v is None else str(v)
    ext = u.get("onPremisesExtensionAttributes") or {}
    for i in range(1, 16):
        row[f"extensionAttribute{i}"] = str(ext.get(f"extensionAttribute{i}") or "")
    row["mail"] = mail
    row["photo"] = ""
    return row


def render_snapshot(state: State) -> tuple[str, str, dict[str, str]]:
    """(directory.csv, groups.toml, user id → mail) in the file source's model."""
    rows: list[dict[str, str]] = []
    mail_of: dict[str, str] = {}
    for uid, u in sorted(state.users.items(), key=lambda kv: str(kv[1].get("mail") or "")):
        row = user_row(u)
        if row is None or row["mail"] in mail_of.values():
            continue
        rows.append(row)
        mail_of[uid] = row["mail"]
    cols = [a for a in ATTRIBUTES if a == "mail" or any(r[a] for r in rows)]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    names: dict[str, str] = {}
    for gid, g in state.groups.items():
        name = str(g.get("displayName") or gid)
        names[gid] = name if name.lower() not in {n.lower() for n in names.values()} else f"{name} ({gid[:8]})"
    groups = []
    for gid, g in sorted(state.groups.items(), key=lambda kv: names[kv[0]].lower()):
        members = []
        for m in g.get("members", []):
            kind, _, oid = m.partition(":")
            if kind == "user" and oid in mail_of:
                members.append(mail_of[oid])  # members without a mailbox cannot send: left out
            elif kind == "group" and oid in names:
                members.append(f"group:{names[oid]}")
        lines = [f"[[group]]\nname = {_toml(names[gid])}"]
        if g.get("mail"):
            lines.append(f"mail = {_toml(str(g['mail']).lower())}")
        if g.get("groupTypes"):
            lines.append("groupTypes = [" + ", ".join(_toml(str(t)) for t in g["groupTypes"]) + "]")
        lines.append("members = [" + ", ".join(_toml(m) for m in sorted(set(members))) + "]")
        groups.append("\n".join(lines))
    header = "# Written by `signature-relay directory sync` from Microsoft Graph; edits are overwritten.\n\n"
    return out.getvalue(), header + "\n\n".join(groups) + ("\n" if groups else ""), mail_of


def _toml(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string


# --- the sync --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    full: bool = False  # ignore the stored delta links
    photos: bool = True
    photo_size: str = "96x96"
    max_drop: float = 0.2  # refuse a snapshot with this fraction fewer users than the current one
    force: bool = False  # accept such a drop


def sync(graph: Graph, root: Path, check: Callable[[Path], list[str]], opts: Options = Options(),
         log: Log = lambda _m: None) -> Result:
    """One sync into ``root`` (``<var_dir>/directory/<tenant>``). ``check(snapshot_dir)`` returns
    the errors of a candidate snapshot (empty: fine). Raises SyncRefused and keeps the current
    snapshot when anything is wrong (state.json is written only after the swap, so a refused or
    failed sync leaves the previous state and delta links as they were)."""
    t0 = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / "state.json"
    state = State.load(state_path)
    before = state.snapshot_users
    is_full = opts.full or not (state.user_link and state.group_link)
    try:
        uc, gc = _rounds(graph, state, is_full, log)
    except ResyncRequired as e:
        log(f"delta link no longer valid ({e}); full synchronisation")
        is_full = True
        uc, gc = _rounds(graph, state, True, log)
    csv_text, groups_text, mail_of = render_snapshot(state)
    users = len(mail_of)  # rows, not lines: a quoted value (a street address) may hold a line break
    if before and not opts.force and users < before * (1 - opts.max_drop):
        raise SyncRefused(f"the sync would drop the directory from {before} to {users} users (more than "
                          f"{opts.max_drop:.0%}); kept the current snapshot. If that is right, run "
                          "`signature-relay directory sync --force`")
    snap = Path(tempfile.mkdtemp(prefix=f"snapshot-{time.strftime('%Y%m%dT%H%M%S')}-", dir=root))
    fetched = 0
    try:
        write_atomic(snap / "directory.csv", csv_text.encode("utf-8"))
        write_atomic(snap / "groups.toml", groups_text.encode("utf-8"))
        if opts.photos:
            fetched = _photos(graph, root, snap, state, mail_of, opts.photo_size, log)
        errors = check(snap)
        if errors:
            shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
            raise SyncRefused(f"the new snapshot does not pass the check ({shown}); kept the current snapshot")
    except BaseException:
        shutil.rmtree(snap, ignore_errors=True)
        raise
    _swap(root, snap)
    state.synced_at, state.snapshot_users = time.time(), users
    state.save(state_path)  # after the swap: a crash before it leaves the old links with the old snapshot
    return Result(is_full, uc, gc, fetched, users, len(state.groups), graph.requests, time.monotonic() - t0,
                  root / "current")


def _rounds(graph: Graph, state: State, full: bool, log: Log) -> tuple[int, int]:
    if full:
        state.users, state.groups, state.user_link, state.group_link = {}, {}, "", ""
    start_u = state.user_link or f"users/delta?$select={','.join(USER_SELECT)}"
    start_g = state.group_link or f"groups/delta?$select={','.join(GROUP_SELECT)}"
    uc = gc = 0
    for p in graph.delta(start_u):
        uc += apply_users(state.users, p.value)
        state.user_link = p.delta_link or state.user_link
    log(f"users: {uc} {'read' if full else 'changed'} ({len(state.users)} in all)")
    for p in graph.delta(start_g):
        gc += apply_groups(state.groups, p.value)
        state.group_link = p.delta_link or state.group_link
    log(f"groups: {gc} {'read' if full else 'changed'} ({len(state.groups)} in all)")
    return uc, gc


def _photos(graph: Graph, root: Path, snap: Path, state: State, mail_of: dict[str, str], size: str,
            log: Log) -> int:
    """Each user's photo into ``snap/photos/<mail>.jpg``: from the previous snapshot when its
    mediaEtag is unchanged, else fetched. Returns how many were fetched."""
    prev = root / "current" / "photos"
    pdir = snap / "photos"
    pdir.mkdir()
    fetched = 0
    etags: dict[str, str] = {}
    for i, (uid, mail) in enumerate(mail_of.items()):
        meta = graph.get(f"users/{uid}/photos/{size}")
        if meta.status_code == 404:
            continue  # no photo (ImageNotFound), or not at this size
        etag = str(meta.json().get("@odata.mediaEtag", ""))
        old = prev / f"{mail}.jpg"
        if etag and state.photos.get(uid) == etag and old.exists():
            shutil.copy2(old, pdir / f"{mail}.jpg")  # unchanged (same mediaEtag): no download
        else:
            r = graph.get(f"users/{uid}/photos/{size}/$value")
            if r.status_code == 404:
                continue
            write_atomic(pdir / f"{mail}.jpg", r.content)
            fetched += 1
        etags[uid] = etag
        if (i + 1) % 1000 == 0:
            log(f"photos: {i + 1}/{len(mail_of)} checked, {fetched} fetched")
    state.photos = etags
    return fetched


def _swap(root: Path, snap: Path) -> None:
    """Make ``snap`` the current snapshot: a symlink replaced by rename(2) (atomic), then the
    folder fsync'd; older snapshots are removed."""
    fsync_dir(snap)
    tmp, current = root / ".current.tmp", root / "current"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(snap.name)
    os.replace(tmp, current)
    fsync_dir(root)
    for d in root.glob("snapshot-*"):
        if d.name != snap.name and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def check_snapshot(name: str, tenant_dir: Path, sig_dir: Path, accepted: frozenset[str],
                   images_base_url: str = "") -> Callable[[Path], list[str]]:
    """The check a snapshot must pass: it loads as the file source does, and every template renders
    for every user (``signature-relay check``)."""
    from relay.policy import Policy, PolicyError

    def run(snap: Path) -> list[str]:
        try:
            p = Policy.load(name, tenant_dir, sig_dir, accepted, images_base_url, directory_dir=snap)
        except (PolicyError, DirectoryError) as e:
            return list(e.errors)
        errors: list[str] = []
        p.render_all(errors)
        return errors

    return run
