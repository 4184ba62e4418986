"""Per-tenant directory: users with Entra ID attribute names, groups with nested membership.

Loaded from the tenant's files (``rules/<tenant>/directory.csv`` and ``groups.toml``) into frozen
objects. The model is what a Microsoft Graph sync would fill later: users keyed by ``mail`` with
``proxyAddresses`` as aliases, groups by name with transitive membership resolved at load.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from relay.errors import ErrorList
from relay.textfile import read_utf8
from relay.values import Image

# Entra ID (Microsoft Graph user resource) attribute names we know. Others are refused at load:
# a typo in a column header must not silently render as nothing.
ATTRIBUTES: Final = (
    "mail", "displayName", "givenName", "surname", "jobTitle", "department", "companyName",
    "businessPhones", "mobilePhone", "officeLocation", "streetAddress", "city", "state", "postalCode",
    "country", "proxyAddresses", "photo", "userType", "employeeId", "faxNumber", "preferredLanguage",
    *(f"extensionAttribute{i}" for i in range(1, 16)),
)
_MULTI: Final = ("businessPhones", "proxyAddresses")
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class DirectoryError(ErrorList):
    """Errors in directory.csv / groups.toml."""


def _clean(v: str) -> str:
    # CR/LF/NUL from a directory must never reach a header or split a template line.
    return _CONTROL.sub("", v.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")).strip()


@dataclass(frozen=True)
class User:
    mail: str  # primary SMTP address, lower case
    attributes: Mapping[str, str]  # single values; multi-valued ones joined by ", "
    aliases: frozenset[str]
    groups: frozenset[str] = frozenset()  # every group the user is in, nested ones included
    photo_image: Image | None = None  # photos/<mail>.jpg|png beside directory.csv (a Graph sync writes them)

    def get(self, name: str) -> str:
        return self.attributes.get(name, "")


@dataclass(frozen=True)
class Group:
    name: str
    mail: str | None
    hidden: bool
    members: tuple[str, ...]  # users (addresses) and "group:<name>"
    # Entra ID's groupTypes: "Unified" marks a Microsoft 365 group (one with its own mailbox that
    # redistributes conversations); absent for distribution and security groups.
    group_types: tuple[str, ...] = ()

    @property
    def microsoft365(self) -> bool:
        return any(t.lower() == "unified" for t in self.group_types)


@dataclass(frozen=True)
class Directory:
    users: Mapping[str, User] = field(default_factory=dict)  # every address (primary + aliases) → user
    groups: Mapping[str, Group] = field(default_factory=dict)  # name (lower case) → group
    members: Mapping[str, frozenset[str]] = field(default_factory=dict)  # group → all user mails, transitive

    def user(self, address: str) -> User | None:
        return self.users.get(address.strip().lower())

    @property
    def people(self) -> list[User]:
        seen: dict[str, User] = {}
        for u in self.users.values():
            seen.setdefault(u.mail, u)
        return list(seen.values())


_RawUser = tuple[str, dict[str, str], set[str]]  # (primary address, attributes, aliases)


def load(tenant_dir: Path) -> Directory:
    """Load ``directory.csv`` and ``groups.toml`` (both optional); every error is collected."""
    errors: list[str] = []
    raw_users = _read_users(tenant_dir / "directory.csv", errors)
    gpath = tenant_dir / "groups.toml"
    groups = _read_groups(gpath, errors) if gpath.exists() else {}
    known = {m for m, _, _ in raw_users} | {a for _, _, al in raw_users for a in al}
    closure = _Closure(groups, known, gpath, errors).all()
    if errors:
        raise DirectoryError(errors)
    primary_of = {a: m for m, _, al in raw_users for a in (m, *al)}
    member_groups: dict[str, set[str]] = {}
    for gkey, mails in closure.items():
        for m in mails:
            member_groups.setdefault(primary_of.get(m, m), set()).add(gkey)
    users: dict[str, User] = {}
    photos = _photos(tenant_dir / "photos")
    for mail, attrs, aliases in raw_users:
        u = User(mail, MappingProxyType(attrs), frozenset(aliases), frozenset(member_groups.get(mail, ())),
                 photos.get(mail))
        for a in (mail, *aliases):
            users[a] = u
    return Directory(MappingProxyType(users), MappingProxyType(groups), MappingProxyType(closure))


def _photos(pdir: Path) -> dict[str, Image]:
    """``photos/<mail>.<jpg|png>`` → the user's photo as a signature image. The image's name
    carries a content hash, so a changed photo never reuses a cached render or cid."""
    out: dict[str, Image] = {}
    if not pdir.is_dir():
        return out
    for f in pdir.iterdir():
        ctype = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}.get(f.suffix.lower())
        if ctype is None or not f.is_file():
            continue
        data = f.read_bytes()
        name = f"photo-{hashlib.sha256(data).hexdigest()[:16]}{f.suffix.lower()}"
        out[f.stem.lower()] = Image(name, ctype, data)
    return out


def _read_users(csv_path: Path, errors: list[str]) -> list[_RawUser]:
    text = read_utf8(csv_path, errors) if csv_path.exists() else None
    if text is None:
        return []
    reader = csv.DictReader(io.StringIO(text))
    for h in [h for h in reader.fieldnames or [] if h not in ATTRIBUTES]:
        errors.append(f"{csv_path}: column {h!r}: unknown attribute (Entra ID names, e.g. jobTitle)")
    if "mail" not in (reader.fieldnames or []):
        errors.append(f"{csv_path}: column 'mail' is required")
    out = []
    for row in reader:
        mail = _clean(row.get("mail") or "").lower()
        if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", mail):
            errors.append(f"{csv_path}:{reader.line_num}: mail: not an address: {mail!r}")
            continue
        attrs, aliases = _attributes(row)
        attrs["mail"] = mail
        out.append((mail, attrs, aliases))
    return out


def _attributes(row: dict[str | Any, str | Any]) -> tuple[dict[str, str], set[str]]:
    """The known attributes of one CSV row, cleaned; multi-valued ones joined; smtp: aliases."""
    attrs: dict[str, str] = {}
    aliases: set[str] = set()
    for k, v in row.items():
        if k is None or k not in ATTRIBUTES or v is None:
            continue
        if k in _MULTI:
            items = [_clean(x) for x in re.split(r"[;|]", v) if _clean(x)]
            if k == "proxyAddresses":
                aliases |= {x.split(":", 1)[1].lower() for x in items if x.lower().startswith("smtp:")}
            attrs[k] = ", ".join(items)
        else:
            attrs[k] = _clean(v)
    return attrs, aliases


def _read_groups(gpath: Path, errors: list[str]) -> dict[str, Group]:
    try:
        data = tomllib.loads(gpath.read_text("utf-8"))
    except UnicodeDecodeError as e:
        raise DirectoryError([f"{gpath}: not UTF-8 (byte at offset {e.start}): save the file as UTF-8"]) from e
    except tomllib.TOMLDecodeError as e:
        raise DirectoryError([f"{gpath}: invalid TOML: {e}"]) from e
    groups: dict[str, Group] = {}
    for i, g in enumerate(data.get("group", [])):
        group = _group(g, f"{gpath}: group[{i}]", errors)
        if group is None:
            continue
        if group.name.lower() in groups:
            errors.append(f"{gpath}: group[{i}].name: duplicate group {group.name!r}")
        groups[group.name.lower()] = group
    extra_top = set(data) - {"group"}
    if extra_top:
        errors.append(f"{gpath}: {sorted(extra_top)[0]}: unknown key (expected [[group]] tables)")
    return groups


def _group(g: dict[str, Any], where: str, errors: list[str]) -> Group | None:
    extra = set(g) - {"name", "mail", "hidden", "members", "groupTypes"}
    if extra:
        errors.append(f"{where}.{sorted(extra)[0]}: unknown key")
    name = str(g.get("name", "")).strip()
    if not name:
        errors.append(f"{where}.name: required")
        return None
    members = g.get("members", [])
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        errors.append(f"{where}.members: expected a list of addresses and 'group:<name>'")
        return None
    types = g.get("groupTypes", [])
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        errors.append(f'{where}.groupTypes: expected a list of strings, as in Entra ID (e.g. ["Unified"])')
        types = []
    mail = g.get("mail")
    if mail is not None and (not isinstance(mail, str) or "@" not in mail):
        errors.append(f"{where}.mail: expected an address like sales@contoso.com")
        mail = None
    return Group(name, mail.strip().lower() if mail else None, bool(g.get("hidden", False)),
                 tuple(m.strip().lower() if not m.startswith("group:") else m.strip() for m in members),
                 tuple(types))


class _Closure:
    """Transitive members of every group; cycles, unknown groups and unknown users are errors."""

    def __init__(self, groups: dict[str, Group], known: set[str], gpath: Path, errors: list[str]) -> None:
        self.groups, self.known, self.gpath, self.errors = groups, known, gpath, errors
        self.closure: dict[str, frozenset[str]] = {}

    def all(self) -> dict[str, frozenset[str]]:
        for key in list(self.groups):
            self.resolve(self.groups[key].name, ())
        return self.closure

    def resolve(self, name: str, path: tuple[str, ...]) -> frozenset[str]:
        key = name.lower()
        if key in self.closure:
            return self.closure[key]
        if key in path:
            self.errors.append(f"{self.gpath}: group {name!r}: membership cycle {' -> '.join((*path, key))}")
            return frozenset()
        g = self.groups.get(key)
        if g is None:
            return frozenset()
        out: set[str] = set()
        for m in g.members:
            if m.startswith("group:"):
                sub = m[6:].strip()
                if sub.lower() not in self.groups:
                    self.errors.append(f"{self.gpath}: group {g.name!r}: member {m!r}: unknown group")
                    continue
                out |= self.resolve(sub, (*path, key))
            elif m not in self.known:
                self.errors.append(f"{self.gpath}: group {g.name!r}: member {m!r}: not a directory user")
            else:
                out.add(m)
        self.closure[key] = frozenset(out)
        return self.closure[key]
