"""Signature rules: who gets which signature. Pure: no I/O beyond loading the tenant's file.

``rules/<tenant>/rules.toml`` holds ordered ``[[rule]]`` tables. For each recipient the rules are
evaluated top to bottom; a matching rule contributes its section (signature, banner or
disclaimer) and, unless ``stop = false``, ends the evaluation. Sections stack in that fixed
order. Recipients whose outcomes differ get separate copies of the message.

    [[rule]]
    name = "Sales"
    senders = { groups = ["Sales"], except_users = ["intern@contoso.com"] }
    recipients = { scope = "external" }
    new = "sales"            # signatures/<tenant>/sales.html.j2
    reply = "sales-short"    # or "none"; absent = same as new
"""

from __future__ import annotations

import bisect
import datetime as dt
import re
import tomllib
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

from relay.directory import ATTRIBUTES, Directory, User
from relay.errors import ErrorList
from relay.memo import Memo

SECTIONS: Final = ("signature", "banner", "disclaimer")
_RULE_KEYS: Final = {"name", "enabled", "senders", "recipients", "keywords", "window", "new", "reply",
                     "placement", "section", "stop", "internal"}
_WHO_KEYS: Final = {"all", "users", "groups", "domains", "where", "except_users", "except_groups",
                    "except_domains", "except_where"}
_RCPT_KEYS: Final = _WHO_KEYS | {"scope"}
# Reply/forward subject prefixes: EN, DE (AW/WG), Nordic (SV/VS), FR (TR/REF), ES/PT (RV/RES/ENC),
# IT (RIF), NL (ANTW/DOORST), PL (ODP/PD).
_REPLY_RE: Final = re.compile(
    r"^\s*(?:re|aw|sv|vs|ref|rif|antw|odp|res|fw|fwd|wg|tr|rv|doorst|pd|enc)\s*(?:\[\d+\])?\s*:", re.I)


class RulesError(ErrorList):
    """Errors in rules.toml."""


@dataclass(frozen=True)
class AttrFilter:
    attribute: str
    op: str  # equals, not_equals, matches, empty, not_empty
    value: str = ""
    regex: re.Pattern[str] | None = None

    def test(self, user: User | None) -> bool:
        v = user.get(self.attribute) if user else ""
        if self.op == "equals":
            return v.casefold() == self.value.casefold()
        if self.op == "not_equals":
            return v.casefold() != self.value.casefold()
        if self.op == "matches":
            assert self.regex is not None
            return bool(self.regex.search(v))
        if self.op == "empty":
            return not v
        return bool(v)

    def __str__(self) -> str:
        return f"{self.attribute} {self.op} {self.value!r}" if self.op not in ("empty", "not_empty") else \
            f"{self.attribute} {self.op}"


@dataclass(frozen=True)
class Who:
    all: bool = False
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    where: tuple[AttrFilter, ...] = ()
    except_users: frozenset[str] = frozenset()
    except_groups: frozenset[str] = frozenset()
    except_domains: frozenset[str] = frozenset()
    except_where: tuple[AttrFilter, ...] = ()
    scope: str = "all"  # recipients only: all, internal, external

    def checks(self, address: str, user: User | None, internal: bool) -> list[tuple[str, bool]]:
        """Each condition with its outcome, for explanations; the rule needs all to be True."""
        out: list[tuple[str, bool]] = []
        dom = address.rpartition("@")[2]
        groups = user.groups if user else frozenset()
        addr = user.mail if user else address
        if self.scope != "all":
            out.append((f"scope {self.scope}", internal == (self.scope == "internal")))
        positive = self.users or self.groups or self.domains or self.where
        if positive and not self.all:
            hit = (addr in self.users or address in self.users or bool(groups & self.groups) or dom in self.domains
                   or (bool(self.where) and all(f.test(user) for f in self.where)))
            out.append(("in " + ", ".join(self._describe()), hit))
        if self.except_users:
            out.append((f"not one of users {sorted(self.except_users)}",
                        addr not in self.except_users and address not in self.except_users))
        if self.except_groups:
            out.append((f"not in groups {sorted(self.except_groups)}", not groups & self.except_groups))
        if self.except_domains:
            out.append((f"not in domains {sorted(self.except_domains)}", dom not in self.except_domains))
        out += [(f"not where {f}", not f.test(user)) for f in self.except_where]
        return out

    def matches(self, address: str, user: User | None, internal: bool) -> bool:
        """Same answer as all(checks(...)), without building the explanation strings (hot path)."""
        if self.scope != "all" and internal != (self.scope == "internal"):
            return False
        dom = address.rpartition("@")[2]
        groups = user.groups if user else frozenset()
        addr = user.mail if user else address
        if not self.all and (self.users or self.groups or self.domains or self.where) and not (
                addr in self.users or address in self.users or groups & self.groups or dom in self.domains
                or (self.where and all(f.test(user) for f in self.where))):
            return False
        if addr in self.except_users or address in self.except_users or groups & self.except_groups:
            return False
        return not (dom in self.except_domains or any(f.test(user) for f in self.except_where))

    def _describe(self) -> list[str]:
        parts = []
        if self.users:
            parts.append(f"users {sorted(self.users)}")
        if self.groups:
            parts.append(f"groups {sorted(self.groups)}")
        if self.domains:
            parts.append(f"domains {sorted(self.domains)}")
        parts += [f"where {f}" for f in self.where]
        return parts


@dataclass(frozen=True)
class Rule:
    index: int
    name: str
    enabled: bool
    senders: Who
    recipients: Who
    trigger: tuple[str, ...]
    suppress: tuple[str, ...]
    keyword_fields: tuple[str, ...]
    start: dt.datetime | None
    end: dt.datetime | None
    new: str | None  # template name, None = no signature for new messages
    reply: str | None
    placement: str  # "reply" (under the newest reply) or "bottom"
    section: str
    stop: bool
    internal: bool  # False: internal recipients never get this rule


@dataclass(frozen=True)
class Message:
    sender: str  # the identity rules are evaluated for (see sender_identity)
    subject: str
    body: str  # decoded text used for keyword conditions (bounded)
    kind: str  # "new" or "reply"
    at: dt.datetime


@dataclass(frozen=True)
class Section:
    section: str
    template: str
    rule: str
    placement: str


Outcome = tuple[Section, ...]


@dataclass(frozen=True)
class _Index:
    """What the outcome cache keys on, precomputed from the rules."""

    keywords: frozenset[str]
    keyword_re: re.Pattern[str] | None
    boundaries: tuple[dt.datetime, ...]
    mentioned: frozenset[str]  # addresses and domains named by any recipient condition
    field_sets: tuple[tuple[str, ...], ...] = ()  # the distinct keyword_fields of rules with keywords

    @classmethod
    def build(cls, rules: Sequence[Rule]) -> _Index:
        kws = frozenset(k.casefold() for r in rules for k in (*r.trigger, *r.suppress))
        rx = re.compile("(?=(" + "|".join(re.escape(k) for k in sorted(kws, key=len, reverse=True)) + "))") \
            if kws else None
        bounds = sorted({b for r in rules for b in (r.start, r.end) if b is not None})
        mentioned = frozenset(x for r in rules for x in (*r.recipients.users, *r.recipients.except_users,
                                                          *r.recipients.domains, *r.recipients.except_domains))
        fsets = tuple(sorted({r.keyword_fields for r in rules if r.trigger or r.suppress}))
        return cls(kws, rx, tuple(bounds), mentioned, fsets)

    def keyword_hits(self, text: str) -> frozenset[str]:
        """Every keyword occurring in ``text``. The look-ahead finds the longest keyword at each
        position; shorter ones starting there are its prefixes, so they are added from it."""
        if self.keyword_re is None or not text:
            return frozenset()
        found: set[str] = set()
        for m in self.keyword_re.finditer(text.casefold()):
            longest = m.group(1)
            found.update(longest[:n] for n in range(1, len(longest) + 1) if longest[:n] in self.keywords)
        return frozenset(found)


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...] = ()
    accepted_domains: frozenset[str] = frozenset()
    _sender_cache: Memo[str, tuple[Rule, ...]] = field(default_factory=lambda: Memo(100_000), compare=False,
                                                       repr=False)
    _outcome_cache: Memo[tuple[object, ...], Outcome] = field(default_factory=lambda: Memo(200_000), compare=False,
                                                              repr=False)
    _idx: dict[int, _Index] = field(default_factory=dict, compare=False, repr=False)

    # --- evaluation ------------------------------------------------------------------------------

    def candidates(self, directory: Directory, sender: str) -> tuple[Rule, ...]:
        """Rules whose sender conditions match ``sender``: cached per sender, so with 1,000 rules a
        message costs one dict lookup plus the few candidate rules (not a scan of all)."""
        def compute() -> tuple[Rule, ...]:
            user = directory.user(sender)
            return tuple(r for r in self.rules if r.enabled and r.senders.matches(sender, user, True))

        return self._sender_cache.get_or_compute(sender, compute)

    def internal(self, address: str) -> bool:
        """Internal = an address in one of the tenant's accepted domains (a contact is not)."""
        return address.rpartition("@")[2].lower() in self.accepted_domains

    def outcome(self, directory: Directory, msg: Message, recipient: str) -> Outcome:
        """The sections ``recipient`` gets. Memoised on everything the answer depends on — sender,
        message kind, which keywords occur where, which time-window interval ``at`` falls in, and
        the recipient (or, for a recipient no rule and no directory entry names, only whether it
        is internal) — so a steady stream costs a few dict lookups instead of a rule scan."""
        idx = self._index()
        r_user = directory.user(recipient)
        internal = self.internal(recipient)
        dom = recipient.rpartition("@")[2]
        if r_user is None and recipient not in idx.mentioned and dom not in idx.mentioned:
            rclass: tuple[str, ...] = ("anon", str(internal))
        else:
            rclass = ("addr", recipient)
        # Keyword hits are keyed on exactly the haystacks the matcher reads: the fields a rule names,
        # joined with a space (a keyword may span "subject body"; issue #11).
        hits = tuple(idx.keyword_hits(_haystack(msg, fields)) for fields in idx.field_sets)
        key = (msg.sender, msg.kind, hits, bisect.bisect_right(idx.boundaries, msg.at), rclass)
        return self._outcome_cache.get_or_compute(key, lambda: self.outcome_uncached(directory, msg, recipient))

    def reads_body(self) -> bool:
        """Whether any rule has a keyword condition on the body: if none has, a message's body text
        need not be decoded for the rules (it costs an HTML parse for HTML-only mail)."""
        return any("body" in fields for fields in self._index().field_sets)

    def _index(self) -> _Index:
        idx = self._idx.get(0)
        if idx is None:
            idx = self._idx[0] = _Index.build(self.rules)
        return idx

    def outcome_uncached(self, directory: Directory, msg: Message, recipient: str) -> Outcome:
        sections: list[Section] = []
        r_user = directory.user(recipient)
        internal = self.internal(recipient)
        for rule in self.candidates(directory, msg.sender):
            if not _rule_matches(rule, msg, recipient, r_user, internal):
                continue
            template = rule.new if msg.kind == "new" else rule.reply
            if template is not None and all(s.section != rule.section for s in sections):
                sections.append(Section(rule.section, template, rule.name, rule.placement))
            if rule.stop:
                break
        return tuple(sorted(sections, key=lambda s: SECTIONS.index(s.section)))

    def split(self, directory: Directory, msg: Message, recipients: Sequence[str]) -> list[tuple[Outcome, list[str]]]:
        """One group per distinct outcome (fewest copies), in first-recipient order."""
        groups: dict[Outcome, list[str]] = {}
        for r in recipients:
            groups.setdefault(self.outcome(directory, msg, r.lower()), []).append(r)
        return list(groups.items())

    def explain(self, directory: Directory, msg: Message, recipient: str) -> list[str]:
        """Human-readable lines: every rule, every condition, true or false."""
        lines = []
        r_user = directory.user(recipient)
        internal = self.internal(recipient)
        s_user = directory.user(msg.sender)
        filled: set[str] = set()
        stopped_by: str | None = None
        for rule in self.rules:
            checks = [("enabled", rule.enabled)]
            checks += [(f"sender {c}", ok) for c, ok in rule.senders.checks(msg.sender, s_user, True)]
            checks += _message_checks(rule, msg, recipient, r_user, internal)
            matched = all(ok for _, ok in checks)
            tmpl = rule.new if msg.kind == "new" else rule.reply
            if stopped_by is not None:
                state = f"skipped: '{stopped_by}' stopped the evaluation"
            elif not matched:
                state = "no match"
            elif tmpl is None:
                state = f"MATCH, no template for {msg.kind} messages"
            elif rule.section in filled:
                state = f"MATCH, not used: the {rule.section} is already set by an earlier rule"
            else:
                state = "MATCH, applied"
                filled.add(rule.section)
            if matched and stopped_by is None and rule.stop:
                stopped_by = rule.name
            lines.append(f"  [{state}] {rule.name} ({rule.section}"
                         f"{', template ' + tmpl if tmpl else ''}{', stop' if rule.stop else ', continue'})")
            lines += [f"        {'true ' if ok else 'false'}  {c}" for c, ok in checks]
        return lines


def _message_checks(rule: Rule, msg: Message, recipient: str, r_user: User | None,
                    internal: bool) -> list[tuple[str, bool]]:
    checks = [(f"recipient {c}", ok) for c, ok in rule.recipients.checks(recipient, r_user, internal)]
    if not rule.internal:
        checks.append(("recipient external (internal mail not stamped by this rule)", not internal))
    hay = _haystack(msg, rule.keyword_fields).casefold()
    if rule.trigger:
        checks.append((f"keywords {list(rule.trigger)} present", any(k.casefold() in hay for k in rule.trigger)))
    if rule.suppress:
        checks.append((f"keywords {list(rule.suppress)} absent", not any(k.casefold() in hay for k in rule.suppress)))
    if rule.start is not None or rule.end is not None:
        ok = (rule.start is None or msg.at >= rule.start) and (rule.end is None or msg.at < rule.end)
        checks.append((f"time in [{rule.start}, {rule.end})", ok))
    return checks


def _haystack(msg: Message, fields: tuple[str, ...]) -> str:
    """The text a keyword condition searches: its fields joined with a space."""
    return " ".join(getattr(msg, f) for f in fields)


def _rule_matches(rule: Rule, msg: Message, recipient: str, r_user: User | None, internal: bool) -> bool:
    """Same answer as all(_message_checks(...)), cheaply (this runs per rule and recipient)."""
    if not rule.recipients.matches(recipient, r_user, internal) or (internal and not rule.internal):
        return False
    if (rule.start is not None and msg.at < rule.start) or (rule.end is not None and msg.at >= rule.end):
        return False
    if rule.trigger or rule.suppress:
        hay = _haystack(msg, rule.keyword_fields).casefold()
        if rule.trigger and not any(k.casefold() in hay for k in rule.trigger):
            return False
        if rule.suppress and any(k.casefold() in hay for k in rule.suppress):
            return False
    return True


def is_reply(subject: str, has_in_reply_to: bool) -> bool:
    return has_in_reply_to or bool(_REPLY_RE.match(subject))


# --- loading --------------------------------------------------------------------------------------


def load(path: Path, directory: Directory, templates: Iterable[str], accepted_domains: frozenset[str]) -> RuleSet:
    """Load ``rules.toml``; every error is collected (file, rule and key named)."""
    if not path.exists():
        return RuleSet((), accepted_domains)
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RulesError([f"{path}: invalid TOML: {e}"]) from e
    errors: list[str] = []
    known_templates = set(templates)
    if set(data) - {"rule"}:
        errors.append(f"{path}: {sorted(set(data) - {'rule'})[0]}: unknown key (expected [[rule]] tables)")
    rules = []
    for i, raw in enumerate(data.get("rule", [])):
        where = f"{path}: rule[{i}]" + (f" ({raw.get('name')!r})" if isinstance(raw, dict) and raw.get("name") else "")
        rule = _rule(i, raw, where, directory, known_templates, errors)
        if rule is not None:
            rules.append(rule)
    if errors:
        raise RulesError(errors)
    return RuleSet(tuple(rules), accepted_domains)


def _rule(i: int, raw: Mapping[str, Any], where: str, directory: Directory, templates: set[str],
          errors: list[str]) -> Rule | None:
    n = len(errors)
    for k in sorted(set(raw) - _RULE_KEYS):
        errors.append(f"{where}.{k}: unknown key")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append(f"{where}.name: required")
        name = f"rule {i}"
    senders = _who(raw.get("senders", {"all": True}), f"{where}.senders", directory, errors, _WHO_KEYS)
    recipients = _who(raw.get("recipients", {"all": True}), f"{where}.recipients", directory, errors, _RCPT_KEYS)
    trigger, suppress, fields = _keywords(raw.get("keywords", {}), f"{where}.keywords", errors)
    start, end = _window(raw.get("window"), f"{where}.window", errors)
    new = raw.get("new")
    reply = raw.get("reply", new)
    for key, val in (("new", new), ("reply", reply)):
        if val is not None and (not isinstance(val, str) or (val != "none" and val not in templates)):
            errors.append(f"{where}.{key}: template {val!r} not found (have: {', '.join(sorted(templates)) or 'none'})")
    placement, section = _placement_and_section(raw, where, errors)
    if len(errors) > n:
        return None
    return Rule(
        index=i, name=name, enabled=raw.get("enabled", True), senders=senders, recipients=recipients,
        trigger=tuple(trigger), suppress=tuple(suppress), keyword_fields=tuple(fields), start=start, end=end,
        new=None if new in (None, "none") else new, reply=None if reply in (None, "none") else reply,
        placement=placement, section=section, stop=raw.get("stop", True), internal=raw.get("internal", True),
    )


def _keywords(kw: Any, where: str, errors: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(trigger, suppress, fields searched) of a rule's ``keywords`` table."""
    trigger = _strs(kw, "trigger", where, errors)
    suppress = _strs(kw, "suppress", where, errors)
    fields = _strs(kw, "in", where, errors) or ["subject", "body"]
    for f in fields:
        if f not in ("subject", "body"):
            errors.append(f"{where}.in: {f!r}: expected subject or body")
    for k in sorted(set(kw) - {"trigger", "suppress", "in"}) if isinstance(kw, dict) else ():
        errors.append(f"{where}.{k}: unknown key")
    return trigger, suppress, fields


def _placement_and_section(raw: Mapping[str, Any], where: str, errors: list[str]) -> tuple[Any, Any]:
    placement = raw.get("placement", "reply")
    if placement not in ("reply", "bottom"):
        errors.append(f"{where}.placement: expected 'reply' or 'bottom', got {placement!r}")
    section = raw.get("section", "signature")
    if section not in SECTIONS:
        errors.append(f"{where}.section: expected one of {', '.join(SECTIONS)}, got {section!r}")
    for key in ("enabled", "stop", "internal"):
        if key in raw and not isinstance(raw[key], bool):
            errors.append(f"{where}.{key}: expected true or false")
    return placement, section


def _strs(table: Any, key: str, where: str, errors: list[str]) -> list[str]:
    v = table.get(key, []) if isinstance(table, dict) else []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        errors.append(f"{where}.{key}: expected a list of strings")
        return []
    return list(v)


def _filters(items: Any, where: str, errors: list[str]) -> tuple[AttrFilter, ...]:
    out = []
    if not isinstance(items, list):
        errors.append(f"{where}: expected a list of {{ attribute = ..., equals|not_equals|matches = ... }}")
        return ()
    for j, f in enumerate(items):
        w = f"{where}[{j}]"
        if not isinstance(f, dict) or "attribute" not in f:
            errors.append(f"{w}: expected {{ attribute = ..., equals|not_equals|matches|empty|not_empty = ... }}")
            continue
        attr = f["attribute"]
        if attr not in ATTRIBUTES:
            errors.append(f"{w}.attribute: unknown attribute {attr!r}")
            continue
        ops = [k for k in f if k != "attribute"]
        if len(ops) != 1 or ops[0] not in ("equals", "not_equals", "matches", "empty", "not_empty"):
            errors.append(f"{w}: exactly one of equals, not_equals, matches, empty, not_empty")
            continue
        op, value = ops[0], f[ops[0]]
        regex = None
        if op == "matches":
            try:
                regex = re.compile(str(value))
            except re.error as e:
                errors.append(f"{w}.matches: bad regular expression {value!r}: {e}")
                continue
        out.append(AttrFilter(attr, op, str(value) if op in ("equals", "not_equals", "matches") else "", regex))
    return tuple(out)


def _who(raw: Any, where: str, directory: Directory, errors: list[str], keys: set[str]) -> Who:
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a table")
        return Who()
    for k in sorted(set(raw) - keys):
        errors.append(f"{where}.{k}: unknown key")
    lists = {k: [x.strip().lower() for x in _strs(raw, k, where, errors)]
             for k in ("users", "domains", "except_users", "except_domains")}
    groups = {}
    for k in ("groups", "except_groups"):
        names = _strs(raw, k, where, errors)
        for g in names:
            if g.lower() not in directory.groups:
                errors.append(f"{where}.{k}: unknown group {g!r}")
        groups[k] = frozenset(g.lower() for g in names)
    scope = raw.get("scope", "all")
    if scope not in ("all", "internal", "external"):
        errors.append(f"{where}.scope: expected all, internal or external, got {scope!r}")
    positive = any(lists[k] for k in ("users", "domains")) or groups["groups"] or raw.get("where")
    return Who(
        all=bool(raw.get("all", not positive)), users=frozenset(lists["users"]), groups=groups["groups"],
        domains=frozenset(lists["domains"]), where=_filters(raw.get("where", []), f"{where}.where", errors),
        except_users=frozenset(lists["except_users"]), except_groups=groups["except_groups"],
        except_domains=frozenset(lists["except_domains"]),
        except_where=_filters(raw.get("except_where", []), f"{where}.except_where", errors), scope=scope,
    )


def _window(raw: Any, where: str, errors: list[str]) -> tuple[dt.datetime | None, dt.datetime | None]:
    if raw is None:
        return None, None
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected {{ start = ..., end = ..., tz = ... }}")
        return None, None
    for k in sorted(set(raw) - {"start", "end", "tz"}):
        errors.append(f"{where}.{k}: unknown key")
    tzname = raw.get("tz", "UTC")
    try:
        tz = _zone(str(tzname))
    except zoneinfo.ZoneInfoNotFoundError:
        errors.append(f"{where}.tz: unknown time zone {tzname!r}")
        return None, None
    out: list[dt.datetime | None] = []
    for k in ("start", "end"):
        v = raw.get(k)
        if v is None:
            out.append(None)
            continue
        if isinstance(v, str):
            try:
                v = dt.datetime.fromisoformat(v)
            except ValueError:
                errors.append(f"{where}.{k}: not a date/time: {v!r}")
                out.append(None)
                continue
        if isinstance(v, dt.date) and not isinstance(v, dt.datetime):
            v = dt.datetime.combine(v, dt.time())
        if not isinstance(v, dt.datetime):
            errors.append(f"{where}.{k}: expected a date/time")
            out.append(None)
            continue
        # A local time is read in the rule's zone: DST is the zone database's business.
        out.append(v if v.tzinfo else v.replace(tzinfo=tz))
    start, end = out
    if start and end and end <= start:
        errors.append(f"{where}: end {end.isoformat()} is not after start {start.isoformat()}")
    return start, end


@lru_cache(maxsize=256)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)
