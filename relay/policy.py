"""A tenant's signature policy: directory + rules + templates, and what the pipeline asks of it.

    msg = message_of(raw, mail_from, at, top)      # what rules and templates may read (clean text)
    policy.plan(msg, recipients)                   -> [(Outcome, [recipients])]   # fewest copies
    policy.render(outcome, msg, recipients)        -> (Signature | None, at_bottom)

Pure apart from loading the tenant's files once.
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime as dt
import email.errors
import email.header
import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from relay import directory as directory_mod
from relay import rules as rules_mod
from relay import signatures as signatures_mod
from relay.config import Config
from relay.directory import Directory
from relay.errors import ConfigErrors, ErrorList
from relay.mime import codec, headers, scanner
from relay.mime.classify import find_targets
from relay.rules import Message, Outcome, RuleSet
from relay.signatures import RenderError, Templates
from relay.values import Image, Signature

KEYWORD_BODY_CHARS: Final = 64 * 1024  # decoded characters of the body that keyword rules read


class PolicyError(ErrorList):
    """Errors anywhere in a tenant's directory, templates or rules."""


@dataclass(frozen=True)
class SenderIdentity:
    address: str
    how: str  # "from", "send-on-behalf (Sender:)", "envelope"


def sender_identity(raw: bytes | bytearray, mail_from: str, top: dict[str, list[str]] | None = None) -> SenderIdentity:
    """Whose rules apply. Send As: From: is the mailbox (no Sender:) → the mailbox owner's rules.
    Send on Behalf: From: is the principal and Sender: the delegate → the delegate's rules, but
    only when Sender: is the envelope sender, as Exchange Online sets it for a delegate: a
    Sender: the user typed themselves must not earn them someone else's (the CEO's) signature
    (issue #10, finding 6)."""
    top = headers.index(raw) if top is None else top
    # The From: parse binding checked the domain of (headers.addresses: one parse, RFC 6532 text).
    frm = [_clean(a.lower()) for a in headers.addresses(top, "from") if a]
    snd = [_clean(a.lower()) for a in headers.addresses(top, "sender") if a]
    if snd and frm and snd[0] != frm[0] and snd[0] == mail_from.lower():
        return SenderIdentity(snd[0], "send-on-behalf (Sender:)")
    if frm:
        return SenderIdentity(frm[0], "from")
    return SenderIdentity(_clean(mail_from.lower()), "envelope")


# C0 and C1 controls and DEL. Values taken from the message reach templates; after RFC 2047
# decoding a Subject can carry CR/LF, and HTML autoescaping keeps them, so a subject could open
# a new MIME part inside the signature (issue #10, finding 3).
_CONTROLS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _clean(value: str) -> str:
    return _CONTROLS.sub(" ", value)


def _subject(top: dict[str, list[str]]) -> str:
    value = headers.text((top.get("subject") or [""])[0])  # RFC 6532: raw UTF-8 is allowed
    try:
        decoded = str(email.header.make_header(email.header.decode_header(value)))
    except (UnicodeError, LookupError, email.errors.HeaderParseError):
        decoded = value
    return _clean(decoded)


def _body_text(raw: bytes | bytearray, scanned: scanner.Scan | None = None) -> str:
    """The message's own text (plain preferred), decoded, then bounded: what keyword rules look at.

    Decode first, bound after (issue #11): cutting the *encoded* body could split a base64 quantum
    or a UTF-8 character, the decode would fail and keyword rules would silently see nothing. Only
    a prefix of the encoded body is decoded (enough for the bound), cut where the encoding allows."""
    s = scanner.scan(raw) if scanned is None else scanned
    t = find_targets(s)
    part = t.get("plain") or t.get("html")
    if part is None:
        return ""
    body = s.body_bytes(part)
    enough = KEYWORD_BODY_CHARS * 4 + 4096  # UTF-8 needs at most 4 bytes a character
    if len(body) > enough:
        body = body[:enough]
        if part.cte == "base64":
            body = re.sub(rb"\s+", b"", body)
            body = body[:len(body) // 4 * 4]  # whole quanta only
        elif part.cte == "quoted-printable":
            body = body[:body.rfind(b"\n") + 1]  # whole encoded lines: never half an "=XX"
    try:
        data = codec.decode_transfer(body, part.cte)
        # An incremental decoder keeps a character cut at the end of the prefix for later
        # instead of failing on it.
        text = codecs.getincrementaldecoder(codec.python_charset(part.charset))().decode(data, final=False)
    except (codec.DecodeError, UnicodeDecodeError):
        return ""
    text = text[:KEYWORD_BODY_CHARS * 4] if part.ctype == "text/html" else text
    return (signatures_mod.html_to_text(text) if part.ctype == "text/html" else text)[:KEYWORD_BODY_CHARS]


def message_of(raw: bytes | bytearray, mail_from: str, at: dt.datetime, top: dict[str, list[str]] | None = None,
               scanned: scanner.Scan | None = None, *, body: bool = True) -> Message:
    """What rules and templates may read of a message; every value free of control characters.
    ``body=False`` leaves the body text empty: for rules that never read it (RuleSet.reads_body;
    templates do not see it)."""
    top = headers.index(raw) if top is None else top
    subject = _subject(top)
    reply = rules_mod.is_reply(subject, bool(top.get("in-reply-to") or top.get("references")))
    return Message(sender=sender_identity(raw, mail_from, top).address, subject=subject,
                   body=_body_text(raw, scanned) if body else "", kind="reply" if reply else "new", at=at)


class Policy:
    """A tenant's loaded directory, rules and templates (data; :meth:`load` reads the files)."""

    def __init__(self, name: str, directory: Directory, templates: Templates, rules: RuleSet,
                 accepted_domains: frozenset[str], has_rules: bool, images_base_url: str = "") -> None:
        self.name, self.directory, self.templates, self.rules = name, directory, templates, rules
        self.accepted_domains, self.has_rules, self.images_base_url = accepted_domains, has_rules, images_base_url

    @classmethod
    def load(cls, name: str, tenant_dir: Path, sig_dir: Path, accepted_domains: frozenset[str],
             images_base_url: str = "", directory_dir: Path | None = None) -> Policy:
        """Read ``rules/<tenant>/`` and ``signatures/<tenant>/``; every error at once (PolicyError).
        ``directory_dir``: where directory.csv and groups.toml are (a Graph snapshot), if not there."""
        errors: list[str] = []
        try:
            directory = directory_mod.load(directory_dir or tenant_dir)
        except directory_mod.DirectoryError as e:
            errors += e.errors
            directory = Directory()
        templates = Templates.load(sig_dir, images_base_url)
        errors += templates.errors
        try:
            rules = rules_mod.load(tenant_dir / "rules.toml", directory, templates.names, accepted_domains)
        except rules_mod.RulesError as e:
            errors += e.errors
            rules = RuleSet((), accepted_domains)
        if errors:
            raise PolicyError(errors)
        return cls(name, directory, templates, rules, accepted_domains, (tenant_dir / "rules.toml").exists(),
                   images_base_url)

    def render_all(self, errors: list[str]) -> int:
        """Render every template for every directory user, new and reply (``check``, and a Graph
        sync before it swaps a snapshot in): the renders that worked; each failure (file, line,
        user) is appended to ``errors``."""
        renders = 0
        for user in self.directory.people:
            for kind in ("new", "reply"):
                msg = rules_mod.Message(sender=user.mail, subject="check", body="", kind=kind,
                                        at=dt.datetime.now(dt.UTC))
                for name in self.templates.templates:
                    try:
                        self.templates.render(name, self.context(msg, ["someone@example.net"]))
                        renders += 1
                    except RenderError as e:
                        errors.append(f"{self.name}: {e} (user {user.mail}, {kind} message)")
        return renders

    def plan(self, msg: Message, recipients: Sequence[str]) -> list[tuple[Outcome, list[str]]]:
        return self.rules.split(self.directory, msg, recipients)

    def context(self, msg: Message, recipients: Sequence[str]) -> dict[str, Any]:
        user = self.directory.user(msg.sender)
        attrs = dict(user.attributes) if user else {"mail": msg.sender}
        photo = user.photo_image if user else None
        if photo is not None:
            # user.photo: the photo as an embedded image (cid:), user.photoUrl: linked, under the
            # tenant's images_base_url (publish the snapshot's photos/ there); nothing without one.
            attrs["photo"] = f"cid:{photo.name}"
            if self.images_base_url:
                attrs["photoUrl"] = f"{self.images_base_url}/photos/{photo.name}"
        internal = all(self.rules.internal(r) for r in recipients)
        return {
            "user": attrs,
            "recipient": {"internal": internal, "count": len(recipients)},
            "message": {"subject": msg.subject, "date": msg.at.isoformat(), "kind": msg.kind},
            "tenant": {"name": self.name, "domains": sorted(self.accepted_domains)},
        }

    def render(self, outcome: Outcome, msg: Message, recipients: Sequence[str]) -> tuple[Signature | None, bool]:
        """The combined signature for one outcome (sections stacked in their fixed order) and
        whether it goes at the bottom. Raises RenderError (caller passes the message through)."""
        if not outcome:
            return None, False
        ctx = self.context(msg, recipients)
        parts = [self.templates.render(s.template, ctx) for s in outcome]
        images: dict[str, Image] = {}
        for p in parts:
            for img in p.images:
                images.setdefault(img.name, img)
        user = self.directory.user(msg.sender)
        photo = user.photo_image if user else None
        if photo is not None and any(f"cid:{photo.name}" in p.html for p in parts):
            images.setdefault(photo.name, photo)  # embedded only where a template shows it
        sig = Signature(html="".join(p.html for p in parts), text="\n".join(p.text.rstrip("\n") for p in parts) + "\n",
                        images=tuple(images.values()))
        return sig, outcome[0].placement == "bottom"


__all__ = ["Policy", "PolicyError", "RenderError", "SenderIdentity", "attach", "message_of", "sender_identity"]


def attach(cfg: Config) -> Config:
    """``cfg`` with every tenant's policy loaded: the step :func:`relay.config.load` leaves out, so
    that loading configuration stays data-only (no Jinja2, no rules engine) for the commands that do
    not stamp. Raises ConfigErrors with every tenant's errors at once; nothing is half-applied."""
    errors: list[str] = []
    tenants = []
    for t in cfg.tenants:
        if t.graph is not None and not t.graph.current.is_dir():
            # Rules may name groups that only Graph knows: say what to do, not "unknown group".
            errors.append(f"{t.source}: directory.source: the directory comes from Microsoft Graph and has not "
                          f"been synced yet ({t.graph.current} missing): run `signature-relay directory sync "
                          f"--tenant {t.name}` first")
            tenants.append(t)
            continue
        try:
            p: Policy | None = Policy.load(t.name, t.source.parent, t.signature_dir or cfg.signatures_dir / t.name,
                                           t.accepted_domains, t.images_base_url, t.directory_dir)
        except PolicyError as e:
            errors += e.errors
            p = None
        tenants.append(dataclasses.replace(t, policy=p))
    if errors:
        raise ConfigErrors(errors)
    return cfg.with_tenants(tenants)
