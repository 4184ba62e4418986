"""The message pipeline: classify → (match rules → render → stamp) → mark. Pure: bytes in, bytes out.

Each step is a small named function and the outcome is a :class:`Decision` value you can print
and log. The rule/render/stamp steps plug in here (issues #3 and #4); until then a message is
classified and marked, and every byte of it is relayed unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.mime import headers, trace


@dataclass(frozen=True)
class Decision:
    action: str  # "stamped", "marked" or "pass-through"
    reason: str

    def __str__(self) -> str:
        return f"{self.action}({self.reason})" if self.reason else self.action


@dataclass(frozen=True)
class Processed:
    data: bytes
    decision: Decision


def already_processed(raw: bytes, header_name: str) -> bool:
    """True when the top-level header already carries the processed marker.

    Mirrors the transport rule's exception (header matches the pattern ``true``), so a message
    the rule lets through to us again is never stamped or marked a second time.
    """
    return any("true" in v.lower() for v in headers.get_all(raw, header_name))


def process(raw: bytes, *, processed_header: str, received: bytes) -> Processed:
    """Run the pipeline on one message. ``received`` is our trace field, always prepended
    (RFC 5321 §4.4: a relay MUST add one; it also lets us count hops to catch loops)."""
    if already_processed(raw, processed_header):
        return Processed(headers.prepend(raw, received), Decision("pass-through", "already-processed"))
    return Processed(
        headers.prepend(raw, received, trace.marker(processed_header)),
        Decision("marked", "stamping-not-configured"),
    )
