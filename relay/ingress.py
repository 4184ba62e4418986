"""Ingress: turn the DATA bytes into the one message every later step reads. Pure; no I/O.

DESIGN, "what we check is what the tenant gets": binding, policy, stamping and delivery must all
see the same header. Delivery (aiosmtplib) rewrites every bare CR and bare LF into CRLF, so a
header we parsed with a bare CR inside a field value (``X-A: a<CR>From: ceo@bank.example``) or a
``<CR><CR><LF>`` "end of header" would reach the tenant as a different header than the one we
bound (issue #10, finding 1). So the line endings are normalised here, first, with exactly
aiosmtplib's rule, and the header section is parsed once from the result and shared.

    >>> msg = accept(b"From: a@contoso.com\\nSubject: x\\n\\nhi\\n", IngressLimits())
    >>> msg.raw, msg.top["from"]
    (b'From: a@contoso.com\\r\\nSubject: x\\r\\n\\r\\nhi\\r\\n', ['a@contoso.com'])

How it fails: :class:`relay.errors.PermanentError` with its reply when the header section holds a
NUL (554 5.6.0: parsers disagree on where such a field ends) or exceeds the configured size or
field count (552 5.3.4: Exchange Online itself caps headers at 256 KB, so a larger one is hostile,
and parsing a million fields would stall the event loop).
"""

from __future__ import annotations

from dataclasses import dataclass

from relay import replies, wire
from relay.errors import PermanentError
from relay.mime import headers


@dataclass(frozen=True)
class IngressLimits:
    max_header_bytes: int = 262_144
    max_header_fields: int = 2000


@dataclass(frozen=True)
class Inbound:
    """The message as it will be delivered (CRLF only) and its top-level header, parsed once."""

    raw: bytes | bytearray  # bytearray: a big message, the DATA reader's own buffer
    top: dict[str, list[str]]  # headers.index(raw): lower-cased name -> values in order
    normalised: bool  # True when line endings had to be rewritten (logged as an anomaly)
    dotless: bool = False  # vouched: no line of ``raw`` starts with a dot (RFC 5321 §4.5.2)


def normalise_line_endings(raw: bytes | bytearray, crlf: bool = False) -> tuple[bytes | bytearray, bool]:
    """``raw`` with every line break as CRLF, and whether anything changed; the common case
    (already CRLF) is decided by :func:`relay.wire.crlf_only` without copying the message, or is
    vouched for by ``crlf`` (the DATA reader checked as the octets arrived)."""
    if crlf or wire.crlf_only(raw):
        return raw, False
    # The rule of aiosmtplib.protocol.LINE_ENDINGS_REGEX (aiosmtplib 5.x): CRLF stays, a bare LF and
    # a CR not followed by LF each become CRLF, so delivery changes nothing more. As three C passes
    # (CRLF to LF, every CR left, a bare one, to LF, every LF to CRLF): the regular expression
    # took half a second on a 25 MB message (issue #14).
    return raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n"), True


def accept(raw: bytes | bytearray, limits: IngressLimits, *, dotless: bool = False, crlf: bool = False) -> Inbound:
    """Normalise, check the header section against ``limits``, parse it once. ``dotless``: the
    DATA reader found no line starting with a dot; it holds for the result unless line endings
    were rewritten (a bare LF before a dot becomes a CRLF before it). ``crlf``: the DATA reader
    found no bare CR or LF (:class:`relay.wire.CrlfCheck`), so there is nothing to normalise."""
    raw, changed = normalise_line_endings(raw, crlf)
    hend = headers.header_end(raw)
    if hend > limits.max_header_bytes:
        raise PermanentError(replies.HEADER_TOO_LARGE, f"header section {hend} bytes > {limits.max_header_bytes}")
    nul = raw.find(b"\x00", 0, hend)
    if nul >= 0:
        raise PermanentError(replies.HEADER_NUL, f"NUL at offset {nul} of the header")
    # Fields = lines that do not continue the previous one (RFC 5322 §2.2.3), counted in C before
    # any per-field work happens.
    # (wire.COUNT, not bytes.count: 1.6 against 13 µs for the first on a 10 KB message.)
    lines = wire.COUNT(raw, b"\r\n", 0, hend)
    fields = lines - wire.COUNT(raw, b"\r\n ", 0, hend) - wire.COUNT(raw, b"\r\n\t", 0, hend)
    if fields > limits.max_header_fields:
        raise PermanentError(replies.HEADER_TOO_LARGE, f"about {fields} header fields > {limits.max_header_fields}")
    return Inbound(raw, headers.index(raw, hend), changed, dotless and not changed)
