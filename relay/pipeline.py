"""The message pipeline: classify → (match rules → render) → stamp → trace. Pure: bytes in, bytes out.

Each step is a small named function and the outcome is a :class:`Decision` value you can print
and log. Until signature rules land (issue #4) the signature is the tenant's static one
(``signatures/<tenant>/signature.html`` + ``signature.txt``); a tenant without one is marked only.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.mime.scanner import Limits
from relay.mime.stamper import DEFAULT_LIMITS, Decision, Signature, already_processed, stamp

__all__ = ["Decision", "Processed", "already_processed", "process"]


@dataclass(frozen=True)
class Processed:
    data: bytes
    decision: Decision
    placement: str = ""
    anomalies: tuple[str, ...] = ()


def process(
    raw: bytes, *, processed_header: str, received: bytes, signature: Signature | None = None,
    mail_from: str | None = None, limits: Limits = DEFAULT_LIMITS,
) -> Processed:
    """Run the pipeline on one message. ``received`` is our trace field, always prepended
    (RFC 5321 §4.4: a relay MUST add one; it also lets us count hops to catch loops)."""
    result = stamp(raw, signature, processed_header=processed_header, mail_from=mail_from, prefix=received,
                   limits=limits)
    return Processed(result.data, result.decision, result.placement, result.anomalies)
