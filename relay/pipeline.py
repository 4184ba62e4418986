"""The one message flow: ingress → rules → render → stamp → trace. Pure: bytes in, copies out.

The relay, ``signature-relay stamp``, ``signature-relay preview`` and the tests all call
:func:`run` with the same :class:`Settings` built from the configuration, so a dry run shows exactly
what production delivers (issue #11: the CLI had copies of this flow that ignored the configured
processed-header name and MIME limits). Binding to a tenant happens before (it needs the peer);
delivery after (it needs the network).

    settings = Settings.of(cfg)
    inbound = accept(raw, settings)                       # one normalisation, one header parse
    tenant = binding.bind(cfg, mail_from, ..., top=inbound.top).tenant   # the relay only
    copies = run(inbound, policy=tenant.policy, envelope=Envelope(mail_from, rcpts, now), settings=settings)

Each step is a small named function and every outcome is a value you can print and log: the
:class:`Decision` per copy (stamped / marked / pass-through and why), the placement, the rules.

How it fails: :class:`relay.errors.PermanentError` from ingress for a header the relay refuses
(NUL, over the limits); nothing else raises — a template that fails to render gives an unstamped,
marked copy with ``render_error`` set.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay import ingress
from relay.mime.scanner import Limits, Scan, scan
from relay.mime.stamper import DEFAULT_LIMITS, Decision, StampResult, already_processed, stamp
from relay.policy import Policy, RenderError, message_of
from relay.rules import Message, Outcome
from relay.values import Signature

if TYPE_CHECKING:
    from relay.config import Config

__all__ = ["Copy", "Decision", "Envelope", "Processed", "Settings", "accept", "already_processed", "plan_copies",
           "process", "run"]


@dataclass(frozen=True)
class Settings:
    """The configuration the flow reads; build it with :meth:`of` from a loaded config."""

    processed_header: str = "X-CodeTwoProcessed"
    limits: Limits = DEFAULT_LIMITS
    ingress: ingress.IngressLimits = field(default_factory=ingress.IngressLimits)

    @classmethod
    def of(cls, cfg: Config) -> Settings:
        sec = cfg.security
        return cls(processed_header=cfg.processed_header, limits=cfg.mime_limits,
                   ingress=ingress.IngressLimits(sec.max_header_bytes, sec.max_header_fields))


# One stamped copy as the flow hands it on: the stamper's result as it stands (its pieces, its
# decision and what it proved about the output for delivery).
Processed = StampResult


def process(
    raw: bytes | bytearray, *, processed_header: str, received: bytes, signature: Signature | None = None,
    mail_from: str | None = None, limits: Limits = DEFAULT_LIMITS,
) -> Processed:
    """Stamp one message with a given signature. ``received`` is our trace field, always prepended
    (RFC 5321 §4.4: a relay MUST add one; it also lets us count hops to catch loops)."""
    return stamp(raw, signature, processed_header=processed_header, mail_from=mail_from, prefix=received,
                 limits=limits)


@dataclass(frozen=True)
class Copy:
    """One copy of the message for the recipients that share an outcome (issue #4 splitting)."""

    recipients: tuple[str, ...]
    processed: Processed
    sections: str  # "signature:Sales,disclaimer:Legal" or "" when nothing applied
    render_error: str | None = None


def _no_trace(_group: Sequence[str]) -> bytes:
    return b""


def accept(raw: bytes | bytearray, settings: Settings, *, dotless: bool = False,
           crlf: bool = False) -> ingress.Inbound:
    """Step 1: the one normalisation and header parse (:mod:`relay.ingress`). The relay binds the
    message to its tenant between this step and :func:`run`. ``dotless``, ``crlf``: what the DATA
    reader saw (no line starting with a dot, carried to delivery; no bare CR or LF)."""
    return ingress.accept(raw, settings.ingress, dotless=dotless, crlf=crlf)


@dataclass(frozen=True)
class Envelope:
    """Who sent the message to whom, and when (the instant time-window rules look at)."""

    mail_from: str
    recipients: tuple[str, ...]
    at: dt.datetime


def run(
    inbound: ingress.Inbound, *, policy: Policy | None, envelope: Envelope, settings: Settings,
    received_for: Callable[[Sequence[str]], bytes] = _no_trace, signature: Signature | None = None,
    bottom: bool = False,
) -> list[Copy]:
    """Step 2: rules → render → stamp → trace for every copy. ``signature`` replaces the tenant's
    rules with one fixed signature for every recipient (``stamp --html/--text``); ``bottom`` forces
    every signature to the end (a dry-run option)."""
    if signature is not None:
        result = stamp(inbound.raw, signature, processed_header=settings.processed_header,
                       mail_from=envelope.mail_from, bottom=bottom, prefix=received_for(envelope.recipients),
                       limits=settings.limits, top=inbound.top, crlf=True, dotless=inbound.dotless)
        return [Copy(envelope.recipients, result, "files")]
    return plan_copies(inbound.raw, inbound.top, policy=policy, envelope=envelope, settings=settings,
                       received_for=received_for, bottom=bottom, crlf=True, dotless=inbound.dotless)


@dataclass(frozen=True)
class _Job:
    """Everything one message's copies share."""

    raw: bytes | bytearray
    top: dict[str, list[str]] | None
    policy: Policy | None
    msg: Message | None
    envelope: Envelope
    settings: Settings
    received_for: Callable[[Sequence[str]], bytes]
    bottom: bool
    crlf: bool  # raw went through ingress: CRLF line breaks only
    dotless: bool  # no line of raw starts with a dot (the DATA reader's finding)
    scanned: Scan  # scan(raw, settings.limits)


def plan_copies(  # noqa: PLR0913 -- keyword-only; what ingress proved rides along (crlf, dotless)
    raw: bytes | bytearray, top: dict[str, list[str]] | None, *, policy: Policy | None, envelope: Envelope,
    settings: Settings, received_for: Callable[[Sequence[str]], bytes] = _no_trace, bottom: bool = False,
    crlf: bool = False, dotless: bool = False,
) -> list[Copy]:
    """Rules → render → stamp for every distinct outcome, on a message that already went through
    ingress (``raw`` CRLF only, ``top`` its header index; ``crlf`` when the caller vouches for
    the former, ``dotless`` when no line starts with a dot). To/Cc are never touched: copies
    differ only in body and envelope."""
    recipients = list(envelope.recipients)
    scanned = scan(raw, settings.limits, crlf=crlf)  # one MIME walk for the rules' view and every copy's stamp
    if policy is None or not policy.has_rules:
        groups: list[tuple[Outcome, list[str]]] = [((), recipients)]
        msg = None
    else:
        msg = message_of(raw, envelope.mail_from, envelope.at, top, scanned, body=policy.rules.reads_body())
        groups = policy.plan(msg, recipients)
    job = _Job(raw, top, policy, msg, envelope, settings, received_for, bottom, crlf, dotless, scanned)
    return [_copy(job, outcome, group) for outcome, group in groups]


def _copy(job: _Job, outcome: Outcome, group: list[str]) -> Copy:
    sig, bottom, error = None, job.bottom, None
    if outcome and job.policy is not None and job.msg is not None:
        try:
            sig, rule_bottom = job.policy.render(outcome, job.msg, group)
            bottom = bottom or rule_bottom
        except RenderError as e:
            error = str(e)  # never a crash, never a 5xx: the copy goes out unstamped (marked)
    result = stamp(job.raw, sig, processed_header=job.settings.processed_header, mail_from=job.envelope.mail_from,
                   bottom=bottom, prefix=job.received_for(group), limits=job.settings.limits, top=job.top,
                   crlf=job.crlf, scanned=job.scanned, dotless=job.dotless)
    return Copy(tuple(group), result, ",".join(f"{x.section}:{x.rule}" for x in outcome), error)
