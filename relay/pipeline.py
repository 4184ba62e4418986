"""The message pipeline: classify → (match rules → render) → stamp → trace. Pure: bytes in, bytes out.

Each step is a small named function and the outcome is a :class:`Decision` value you can print
and log. :func:`plan_copies` runs the tenant's rules (one copy per distinct outcome), renders each
outcome's signature and stamps it; a tenant without rules is marked only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relay.mime import headers
from relay.mime.scanner import Limits
from relay.mime.stamper import DEFAULT_LIMITS, Decision, Signature, already_processed, stamp
from relay.policy import Policy, RenderError, message_of
from relay.rules import Outcome

__all__ = ["Copy", "Decision", "Processed", "already_processed", "plan_copies", "process"]


@dataclass(frozen=True)
class Processed:
    data: bytes
    decision: Decision
    placement: str = ""
    anomalies: tuple[str, ...] = ()
    doubts: tuple[str, ...] = ()  # placements that are guesses (logged as placement_unsure=)


def process(
    raw: bytes, *, processed_header: str, received: bytes, signature: Signature | None = None,
    mail_from: str | None = None, limits: Limits = DEFAULT_LIMITS,
) -> Processed:
    """Run the pipeline on one message. ``received`` is our trace field, always prepended
    (RFC 5321 §4.4: a relay MUST add one; it also lets us count hops to catch loops)."""
    result = stamp(raw, signature, processed_header=processed_header, mail_from=mail_from, prefix=received,
                   limits=limits)
    return Processed(result.data, result.decision, result.placement, result.anomalies, result.doubts)


@dataclass(frozen=True)
class Copy:
    """One copy of the message for the recipients that share an outcome (issue #4 splitting)."""

    recipients: tuple[str, ...]
    processed: Processed
    sections: str  # "signature:Sales,disclaimer:Legal" or "" when nothing applied
    render_error: str | None = None


def plan_copies(
    raw: bytes, *, policy: Policy | None, mail_from: str, recipients: Sequence[str], at: dt.datetime,
    processed_header: str, received_for: Callable[[Sequence[str]], bytes], limits: Limits = DEFAULT_LIMITS,
    top: dict[str, list[str]] | None = None,
) -> list[Copy]:
    """Rules → render → stamp for every distinct outcome. Pure (runs in a worker thread for big
    messages). To/Cc headers are never touched: copies differ only in body and envelope.
    ``top`` is the message's header index, parsed once by :mod:`relay.ingress`."""
    top = headers.index(raw) if top is None else top
    if policy is None or not policy.has_rules:
        groups: list[tuple[Outcome, list[str]]] = [((), list(recipients))]
        msg = None
    else:
        msg = message_of(raw, mail_from, at, top)
        groups = policy.plan(msg, recipients)
    copies = []
    for outcome, group in groups:
        sig, bottom, error = None, False, None
        if outcome and policy is not None and msg is not None:
            try:
                sig, bottom = policy.render(outcome, msg, group)
            except RenderError as e:
                error = str(e)  # never a crash, never a 5xx: the copy goes out unstamped (marked)
        result = stamp(raw, sig, processed_header=processed_header, mail_from=mail_from, bottom=bottom,
                       prefix=received_for(group), limits=limits, top=top)
        copies.append(Copy(tuple(group), Processed(result.data, result.decision, result.placement, result.anomalies,
                                                   result.doubts),
                           ",".join(f"{x.section}:{x.rule}" for x in outcome), error))
    return copies
