"""A local HTTPS emulator of the Microsoft Graph endpoints the directory sync uses, and of the
Entra ID token endpoint (the same client-assertion check as tests/exo_emulator.py).

Shapes, as Microsoft documents them:

* ``GET /v1.0/users/delta?$select=…`` (learn.microsoft.com/graph/api/user-delta,
  learn.microsoft.com/graph/delta-query-users): ``{"@odata.context", "value": [...],
  "@odata.nextLink"}`` pages, the last one with ``@odata.deltaLink`` instead; the links carry
  ``$skiptoken`` / ``$deltatoken`` and keep the ``$select``. In a later round a changed user comes
  with its ``id`` and (at least) the changed properties only; a deleted one as ``{"id",
  "@removed": {"reason": "deleted"}}``.
* ``GET /v1.0/groups/delta?$select=…,members`` (learn.microsoft.com/graph/api/group-delta,
  .../delta-query-groups): groups with ``members@delta`` — ``{"@odata.type":
  "#microsoft.graph.user"|"#microsoft.graph.group", "id"}``, a removed member with ``@removed``;
  one group's members may be spread over several pages.
* ``GET /v1.0/users/{id}/photos/{size}`` and ``.../$value`` (learn.microsoft.com/graph/api/
  profilephoto-get): metadata with ``@odata.mediaEtag``, ``id``, ``width``, ``height``; a user
  without a photo gets 404 ``ImageNotFound``.
* Errors ``{"error": {"code", "message", "innerError"}}`` (learn.microsoft.com/graph/errors);
  throttling 429 with ``Retry-After`` (learn.microsoft.com/graph/throttling); 403
  ``Authorization_RequestDenied`` "Insufficient privileges to complete the operation."; an expired
  delta token 400 ``syncStateNotFound`` (Microsoft 365 developer blog, "Duration of change tracking
  tokens for identity and education resources") or 410 Gone.
"""

from __future__ import annotations

import json
import secrets
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from cryptography import x509

from tests.exo_emulator import TlsServer, client_credentials

USER_T, GROUP_T = "#microsoft.graph.user", "#microsoft.graph.group"


@dataclass
class GraphState:
    tenant_id: str
    app_id: str
    app_cert: x509.Certificate
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # id → {displayName, mail, groupTypes, members}
    photos: dict[str, bytes] = field(default_factory=dict)
    version: int = 0
    # change log: (version, kind "user"|"group", id, changed property names or None = whole object/removed)
    log: list[tuple[int, str, str, frozenset[str] | None]] = field(default_factory=list)
    member_log: list[tuple[int, str, str, bool]] = field(default_factory=list)  # (version, group, member key, added)
    page_size: int = 100
    inject: list[str] = field(default_factory=list)  # "429", "503", "401", "403", "expired", "410"
    tokens: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)
    base: str = ""

    # --- what an admin does in Entra ID ------------------------------------------------------------

    def add_user(self, uid: str, **props: Any) -> None:
        self.version += 1
        self.users[uid] = {"id": uid, **props}
        self.log.append((self.version, "user", uid, None))

    def change_user(self, uid: str, **props: Any) -> None:
        self.version += 1
        self.users[uid].update(props)
        self.log.append((self.version, "user", uid, frozenset(props)))

    def delete_user(self, uid: str) -> None:
        self.version += 1
        del self.users[uid]
        self.log.append((self.version, "user", uid, None))

    def add_group(self, gid: str, name: str, members: list[str], **props: Any) -> None:
        self.version += 1
        self.groups[gid] = {"id": gid, "displayName": name, "members": list(members), **props}
        self.log.append((self.version, "group", gid, None))

    def add_member(self, gid: str, member: str) -> None:
        self.version += 1
        self.groups[gid]["members"].append(member)
        self.member_log.append((self.version, gid, member, True))

    def remove_member(self, gid: str, member: str) -> None:
        self.version += 1
        self.groups[gid]["members"].remove(member)
        self.member_log.append((self.version, gid, member, False))


def _err(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message,
                      "innerError": {"date": "2026-11-28T12:00:00", "request-id": secrets.token_hex(8)}}}


class _Handler(BaseHTTPRequestHandler):
    state: GraphState

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "image/jpeg" if isinstance(body, bytes) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        st = self.state
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if not self.path.endswith("/oauth2/v2.0/token"):
            self._send(404, _err("NotFound", "no such endpoint"))
            return
        f = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode()).items()}
        self._send(*client_credentials(f, st.app_id, st.app_cert, f"{st.base}/{st.tenant_id}/oauth2/v2.0/token",
                                       ("https://graph.microsoft.com/.default",), st.tokens))

    def do_GET(self) -> None:  # one branch per documented endpoint
        st = self.state
        if self.path.endswith("/.well-known/openid-configuration"):
            t = st.tenant_id
            self._send(200, {"token_endpoint": f"{st.base}/{t}/oauth2/v2.0/token",
                             "authorization_endpoint": f"{st.base}/{t}/oauth2/v2.0/authorize",
                             "issuer": f"{st.base}/{t}/v2.0"})
            return
        st.requests.append(self.path)
        if st.inject and not (st.inject[0] in ("expired", "410") and "deltatoken" not in self.path):
            what = st.inject.pop(0)
            if what in ("429", "503"):
                self._send(int(what), _err("TooManyRequests" if what == "429" else "ServiceUnavailable",
                                           "Please retry after"), {"Retry-After": "0"})
                return
            if what == "401":
                self._send(401, _err("InvalidAuthenticationToken", "Access token validation failure."))
                return
            if what == "403":
                self._send(403, _err("Authorization_RequestDenied",
                                     "Insufficient privileges to complete the operation."))
                return
            if what == "expired":
                self._send(400, _err("syncStateNotFound", "The sync state generation is not found. The delta token "
                                     "is expired and data must be synchronized again."))
                return
            if what == "410":
                self._send(410, _err("resyncRequired", "Resync required. Replace any local cached copies of the "
                                     "directory objects with the results of a full sync."))
                return
        if self.headers.get("Authorization", "")[7:] not in st.tokens:
            self._send(401, _err("InvalidAuthenticationToken", "Access token is empty."))
            return
        url = urllib.parse.urlsplit(self.path)
        q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        parts = url.path.split("/")[2:]  # after /v1.0/
        if parts in (["users", "delta"], ["groups", "delta"]):
            self._delta(parts[0], q)
            return
        if len(parts) >= 4 and parts[0] == "users" and parts[2] == "photos":
            uid = parts[1]
            if uid not in st.users or uid not in st.photos:
                self._send(404, _err("ImageNotFound", "Exception of type 'Microsoft.Fast.Profile.Core.Exception."
                                     "ImageNotFoundException' was thrown."))
                return
            etag = f'W/"{hash(st.photos[uid]) & 0xFFFFFFFF:08x}"'
            if len(parts) == 5 and parts[4] == "$value":
                self._send(200, st.photos[uid], {"ETag": etag})
                return
            w = int(parts[3].split("x")[0])
            self._send(200, {"@odata.context": f"{st.base}/v1.0/$metadata#users('{uid}')/photos/$entity",
                             "@odata.mediaContentType": "image/jpeg", "@odata.mediaEtag": etag,
                             "id": parts[3].upper(), "height": w, "width": w})
            return
        self._send(404, _err("Request_ResourceNotFound", f"Resource '{url.path}' does not exist."))

    def _delta(self, kind: str, q: dict[str, str]) -> None:
        st = self.state
        select = q.get("$select", "")
        coll = st.users if kind == "users" else st.groups
        if "$deltatoken" in q:
            since = int(q["$deltatoken"])
            items = self._changes(kind, since, select)
        else:
            items = [self._full(kind, o, select) for o in coll.values()]
            if kind == "groups":
                items = self._spread_members(items)
        skip = int(q.get("$skiptoken", "0"))
        page = items[skip:skip + st.page_size]
        keep = urllib.parse.urlencode({"$select": select}) if select else ""
        body: dict[str, Any] = {"@odata.context": f"{st.base}/v1.0/$metadata#{kind}({select})", "value": page}
        if skip + st.page_size < len(items):
            token = q.get("$deltatoken")
            body["@odata.nextLink"] = (f"{st.base}/v1.0/{kind}/delta?{keep}&$skiptoken={skip + st.page_size}"
                                       + (f"&$deltatoken={token}" if token else ""))
        else:
            body["@odata.deltaLink"] = f"{st.base}/v1.0/{kind}/delta?{keep}&$deltatoken={st.version}"
        self._send(200, body)

    def _full(self, kind: str, o: dict[str, Any], select: str) -> dict[str, Any]:
        fields = set(select.split(",")) if select else set(o)
        out = {k: v for k, v in o.items() if k in fields or k == "id"}
        if kind == "groups":
            out.pop("members", None)
            out["members@delta"] = [{"@odata.type": GROUP_T if m.startswith("group:") else USER_T,
                                     "id": m.split(":", 1)[1]} for m in o.get("members", [])]
        return out

    def _spread_members(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Large groups come back in pieces: the same group object again with more members."""
        out: list[dict[str, Any]] = []
        for g in items:
            members = g["members@delta"]
            out.append({**g, "members@delta": members[:3]})
            for i in range(3, len(members), 3):
                out.append({"id": g["id"], "members@delta": members[i:i + 3]})
        return out

    def _changes(self, kind: str, since: int, select: str) -> list[dict[str, Any]]:
        st = self.state
        coll = st.users if kind == "users" else st.groups
        changed: dict[str, frozenset[str] | None] = {}
        for v, k, oid, props in st.log:
            if v > since and k == kind[:-1]:
                prev = changed.get(oid, frozenset())
                changed[oid] = None if props is None or prev is None else prev | props
        out: list[dict[str, Any]] = []
        for oid, props in changed.items():
            if oid not in coll:
                out.append({"id": oid, "@removed": {"reason": "deleted"}})
            elif props is None:
                out.append(self._full(kind, coll[oid], select))
            else:  # "at least the changed properties" (delta-query-overview)
                out.append({"id": oid, **{p: coll[oid].get(p) for p in props}})
        if kind == "groups":
            members: dict[str, list[dict[str, Any]]] = {}
            for v, gid, m, added in st.member_log:
                if v > since:
                    entry: dict[str, Any] = {"@odata.type": GROUP_T if m.startswith("group:") else USER_T,
                                             "id": m.split(":", 1)[1]}
                    if not added:
                        entry["@removed"] = {"reason": "deleted"}
                    members.setdefault(gid, []).append(entry)
            for gid, entries in members.items():
                out.append({"id": gid, "members@delta": entries})
        return out


class GraphEmulator(TlsServer):
    def __init__(self, state: GraphState, cert: Path, key: Path) -> None:
        super().__init__(_Handler, state, cert, key)
        self.state = state

    def __enter__(self) -> GraphEmulator:
        super().__enter__()
        return self
