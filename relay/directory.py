"""Per-tenant directory: users with Entra ID attribute names, groups with nested membership.

Loaded from the tenant's files (``rules/<tenant>/directory.csv`` and ``groups.toml``) into frozen
objects. The model is what a Microsoft Graph sync would fill later: users keyed by ``mail`` with
``proxyAddresses`` as aliases, groups by name with transitive membership resolved at load.
"""

from __future__ import annotations

import csv
import io
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

from relay.errors import ErrorList

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

    def get(self, name: str) -> str:
        return self.attributes.get(name, "")


@dataclass(frozen=True)
class Group:
    name: str
    mail: str | None
    hidden: bool
    members: tuple[str, ...]  # users (addresses) and "group:<name>"


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


def load(tenant_dir: Path) -> Directory:
    """Load ``directory.csv`` and ``groups.toml`` (both optional); every error is collected."""
    errors: list[str] = []
    users: dict[str, User] = {}
    csv_path = tenant_dir / "directory.csv"
    raw_users: list[tuple[str, dict[str, str], set[str]]] = []
    text = None
    if csv_path.exists():
        blob = csv_path.read_bytes()
        try:
            text = blob.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = blob.count(b"\n", 0, e.start) + 1
            errors.append(f"{csv_path}:{line}: not UTF-8 (byte 0x{blob[e.start]:02x} at offset {e.start}; looks like "
                          f"Latin-1/Windows-1252): save the file as UTF-8")
    if text is not None:
        reader = csv.DictReader(io.StringIO(text))
        unknown = [h for h in reader.fieldnames or [] if h not in ATTRIBUTES]
        for h in unknown:
            errors.append(f"{csv_path}: column {h!r}: unknown attribute (Entra ID names, e.g. jobTitle)")
        if "mail" not in (reader.fieldnames or []):
            errors.append(f"{csv_path}: column 'mail' is required")
        for row in reader:
            line = reader.line_num
            mail = _clean(row.get("mail") or "").lower()
            if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", mail):
                errors.append(f"{csv_path}:{line}: mail: not an address: {mail!r}")
                continue
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
            attrs["mail"] = mail
            raw_users.append((mail, attrs, aliases))
    groups: dict[str, Group] = {}
    gpath = tenant_dir / "groups.toml"
    if gpath.exists():
        try:
            data = tomllib.loads(gpath.read_text("utf-8"))
        except UnicodeDecodeError as e:
            raise DirectoryError([f"{gpath}: not UTF-8 (byte at offset {e.start}): save the file as UTF-8"]) from e
        except tomllib.TOMLDecodeError as e:
            raise DirectoryError([f"{gpath}: invalid TOML: {e}"]) from e
        for i, g in enumerate(data.get("group", [])):
            where = f"{gpath}: group[{i}]"
            extra = set(g) - {"name", "mail", "hidden", "members"}
            if extra:
                errors.append(f"{where}.{sorted(extra)[0]}: unknown key")
            name = str(g.get("name", "")).strip()
            if not name:
                errors.append(f"{where}.name: required")
                continue
            members = g.get("members", [])
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                errors.append(f"{where}.members: expected a list of addresses and 'group:<name>'")
                continue
            if name.lower() in groups:
                errors.append(f"{where}.name: duplicate group {name!r}")
            groups[name.lower()] = Group(name, g.get("mail"), bool(g.get("hidden", False)),
                                         tuple(m.strip().lower() if not m.startswith("group:") else m.strip()
                                               for m in members))
        extra_top = set(data) - {"group"}
        if extra_top:
            errors.append(f"{gpath}: {sorted(extra_top)[0]}: unknown key (expected [[group]] tables)")
    known = {m for m, _, _ in raw_users} | {a for _, _, al in raw_users for a in al}
    closure: dict[str, frozenset[str]] = {}

    def resolve(name: str, path: tuple[str, ...]) -> frozenset[str]:
        key = name.lower()
        if key in closure:
            return closure[key]
        if key in path:
            errors.append(f"{gpath}: group {name!r}: membership cycle {' -> '.join((*path, key))}")
            return frozenset()
        g = groups.get(key)
        if g is None:
            return frozenset()
        out: set[str] = set()
        for m in g.members:
            if m.startswith("group:"):
                sub = m[6:].strip()
                if sub.lower() not in groups:
                    errors.append(f"{gpath}: group {g.name!r}: member {m!r}: unknown group")
                    continue
                out |= resolve(sub, (*path, key))
            elif m not in known:
                errors.append(f"{gpath}: group {g.name!r}: member {m!r}: not a directory user")
            else:
                out.add(m)
        closure[key] = frozenset(out)
        return closure[key]

    for key in list(groups):
        resolve(groups[key].name, ())
    if errors:
        raise DirectoryError(errors)
    primary_of = {a: m for m, _, al in raw_users for a in (m, *al)}
    member_groups: dict[str, set[str]] = {}
    for gkey, mails in closure.items():
        for m in mails:
            member_groups.setdefault(primary_of.get(m, m), set()).add(gkey)
    for mail, attrs, aliases in raw_users:
        u = User(mail, MappingProxyType(attrs), frozenset(aliases), frozenset(member_groups.get(mail, ())))
        for a in (mail, *aliases):
            users[a] = u
    return Directory(MappingProxyType(users), MappingProxyType(groups), MappingProxyType(closure))
