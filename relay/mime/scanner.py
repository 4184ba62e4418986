"""A tolerant MIME walker that records byte ranges, never decodes bodies it does not touch.

Like the ``email`` package it never raises on bad input: surprises become *defects* on the
result, and the stamper passes a message with structural defects through untouched. Unlike the
``email`` package it keeps exact byte offsets, so the stamper can splice one leaf and copy every
other byte as received.

Boundaries follow RFC 2046 §5.1.1: a delimiter is ``--boundary`` at the start of a line,
optionally followed by white space; the CRLF before it belongs to the delimiter; the close
delimiter is ``--boundary--``. Bodies of ``message/rfc822`` parts are not entered: we never
stamp an attached message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from relay import wire

# The empty line ending a header block; "\n\r?\n" ends where "\r?\n\r?\n" ends and, starting with a
# literal, is found by a fast scan (relay.mime.headers._END_RE says more).
_HEADER_END: Final = re.compile(rb"\n\r?\n")
_FOLD: Final = re.compile(rb"\r?\n[ \t]")  # RFC 5322 §2.2.3 unfolding
_SECTION: Final = re.compile(r"([^*]+)\*(\d+)\*?")  # RFC 2231 §3 parameter continuations
_MEDIA_TYPE: Final = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
_LINE: Final = re.compile(rb"[^\n]*\n|[^\n]+$")


@dataclass(frozen=True)
class Limits:
    max_depth: int = 100  # Postfix mime_nesting_limit
    max_parts: int = 1000
    max_header_bytes: int = 102_400  # Postfix header_size_limit


@dataclass
class Part:
    index: int
    parent: int | None
    depth: int
    start: int  # first header byte
    header_end: int  # first body byte (just after the empty line), == start for a part without header
    end: int  # just after the last body byte (before the delimiter's CRLF)
    ctype: str  # "text/plain", lower case; RFC 2045 §5.2 default text/plain
    params: dict[str, str]
    cte: str  # lower case; "7bit" when absent (RFC 2045 §6.1)
    disposition: str  # "inline", "attachment" or "" when absent
    filename: str | None
    children: list[int] = field(default_factory=list)
    boundary: bytes | None = None
    close_at: int | None = None  # multipart: offset of the line break before "--boundary--"

    @property
    def maintype(self) -> str:
        return self.ctype.split("/", 1)[0]

    @property
    def is_multipart(self) -> bool:
        return self.maintype == "multipart" and self.boundary is not None

    @property
    def is_attachment(self) -> bool:
        return self.disposition == "attachment" or self.filename is not None

    @property
    def charset(self) -> str | None:
        cs = self.params.get("charset")
        return cs.strip().lower() if cs else None


@dataclass
class Scan:
    raw: bytes | bytearray
    parts: list[Part]
    defects: list[str]  # structural: the stamper will not edit such a message
    anomalies: list[str] = field(default_factory=list)  # tolerated and reported (bare CR/LF)

    @property
    def root(self) -> Part:
        return self.parts[0]

    def walk(self, index: int = 0) -> list[Part]:
        """Parts in document order, depth first (``message/rfc822`` bodies not entered)."""
        out: list[Part] = []
        stack = [index]
        while stack:
            p = self.parts[stack.pop()]
            out.append(p)
            stack.extend(reversed(p.children))
        return out

    def header_bytes(self, part: Part) -> bytes:
        return take(self.raw, part.start, part.header_end)

    def body_bytes(self, part: Part) -> bytes:
        return take(self.raw, part.header_end, part.end)


def take(raw: bytes | bytearray, start: int, end: int) -> bytes:
    """``raw[start:end]`` as ``bytes`` with one copy, also from a big message's bytearray."""
    return raw[start:end] if isinstance(raw, bytes) else bytes(memoryview(raw)[start:end])


def _split_params(value: str) -> list[str]:
    """Split on ";" outside double quotes (a quoted boundary may contain ";")."""
    if '"' not in value:
        return value.split(";")
    out: list[str] = []
    cur: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


def parse_params(value: str) -> tuple[str, dict[str, str]]:
    """``'text/plain; charset="utf-8"'`` → ``("text/plain", {"charset": "utf-8"})``.

    Handles quoted strings and RFC 2231 continuations/charsets well enough to find boundaries,
    charsets and filenames; the value before the first ``;`` is lower-cased.
    """
    pieces = _split_params(value)
    main = pieces[0].strip().lower()
    params: dict[str, str] = {}
    continued: dict[str, list[tuple[int, str]]] = {}
    for piece in pieces[1:]:
        k, eq, v = piece.partition("=")
        if not eq:
            continue
        k = k.strip().lower()
        v = v.strip()
        if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
            v = re.sub(r"\\(.)", r"\1", v[1:-1]) if "\\" in v else v[1:-1]
        if "*" in k:
            m = _SECTION.fullmatch(k)
            if m:
                continued.setdefault(m.group(1), []).append((int(m.group(2)), v))
                continue
            if k.endswith("*"):
                k = k[:-1]
                v = _rfc2231(v)
        params.setdefault(k, v)
    for k, chunks in continued.items():
        params.setdefault(k, _rfc2231("".join(v for _, v in sorted(chunks))))
    return main, params


def _rfc2231(v: str) -> str:
    from urllib.parse import unquote

    cs, q1, rest = v.partition("'")
    if not q1:
        return v
    _lang, _q2, text = rest.partition("'")
    try:
        return unquote(text, encoding=cs or "us-ascii", errors="strict")
    except (LookupError, UnicodeDecodeError):
        return unquote(text, encoding="latin-1")


# Both are searched in b"\n" + block, where index i is index i of the block and every line start,
# the first included, follows a "\n": a pattern that starts with the literal "\n" is found by a fast
# scan, where "^" (re.M) costs an attempt at every byte, some 10 ns per byte of header, 0.2 ms per
# message under Exchange Online's 12 KB of fields (tests/unit/test_header_regexes.py compares the
# "^" forms with these).
# A header line that is neither a field ("name:") nor a continuation (leading WSP).
_BAD_LINE: Final = re.compile(rb"\n(?![ \t])(?![!-9;-~]+[ \t]*:)[^\r\n]+")
# A Content-* field with its continuation lines (RFC 5322 §2.2.3 folding).
_CONTENT_FIELD: Final = re.compile(rb"\n(content-[a-z0-9-]+)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)", re.I)


def _unfold(raw: bytes | bytearray, start: int, end: int) -> tuple[dict[str, str], int | None]:
    """The Content-* fields of a header block (first occurrence wins), unfolded, and the offset
    of the first line that is neither a field nor a continuation (None when clean).

    Regexes over the block rather than a Python loop per line: this runs for every part."""
    lined = b"\n" + raw[start:end]  # see _BAD_LINE
    out: dict[str, str] = {}
    for m in _CONTENT_FIELD.finditer(lined):
        name = m.group(1).decode("latin-1").lower()
        if name not in out:
            value = _FOLD.sub(b" ", m.group(2)).strip()
            out[name] = value.decode("latin-1")
    bad = _BAD_LINE.search(lined)
    # The email package ends the header at such a line and reads the rest as body; clients
    # differ. We cannot know which bytes a reader will take as body, so we do not edit.
    return out, (start + bad.start()) if bad else None


def _header_end(raw: bytes | bytearray, start: int, end: int) -> int | None:
    if raw.startswith(b"\r\n", start) or raw.startswith(b"\n", start):
        return start + (2 if raw.startswith(b"\r\n", start) else 1)
    m = _HEADER_END.search(raw, start, end)
    return m.end() if m else None


def scan(raw: bytes | bytearray, limits: Limits | None = None, *, crlf: bool = False) -> Scan:
    """Walk ``raw`` (a whole message) and return every part with its byte ranges. ``crlf``: the
    caller vouches that every line break is CRLF (ingress made it so), so there are no line-ending
    anomalies to count."""
    s = Scan(raw, [], [])
    _entity(s, limits or Limits(), 0, len(raw), None, 0)
    # The top-level header only: counting a 25 MB attachment would cost more than stamping it.
    # The stamper checks the leaves it edits.
    if not crlf:
        s.anomalies += line_anomalies(raw, 0, s.parts[0].header_end if s.parts else len(raw))
    return s


def line_anomalies(raw: bytes | bytearray, start: int, end: int) -> list[str]:
    """``bare-lf`` / ``bare-cr`` when ``raw[start:end]`` has line breaks other than CRLF."""
    crlf = raw.count(b"\r\n", start, end)
    out = []
    if raw.count(b"\n", start, end) != crlf:
        out.append("bare-lf")
    if raw.count(b"\r", start, end) != crlf:
        out.append("bare-cr")
    return out


def _entity(s: Scan, limits: Limits, start: int, end: int, parent: int | None, depth: int) -> None:
    raw = s.raw
    if len(s.parts) >= limits.max_parts:
        if "too-many-parts" not in s.defects:
            s.defects.append("too-many-parts")
        return
    hend = _header_end(raw, start, end)
    if hend is None:
        # No empty line: the whole entity is header (RFC 5322 allows a message without body),
        # but then there is no body to edit and no separator to edit after.
        hend = end
        if end > start:
            s.defects.append(f"no-header-body-separator@{start}")
    if hend - start > limits.max_header_bytes:
        s.defects.append(f"header-too-large@{start}")
    fields, bad_line = _unfold(raw, start, hend)
    if bad_line is not None:
        s.defects.append(f"malformed-header-line@{bad_line}")
    ctype, params = _content_type(s, fields.get("content-type", ""), start, parent)
    disp_raw = fields.get("content-disposition", "")
    disp, dparams = parse_params(disp_raw) if disp_raw else ("", {})
    filename = dparams.get("filename") or params.get("name")
    part = Part(
        index=len(s.parts), parent=parent, depth=depth, start=start, header_end=hend, end=end, ctype=ctype,
        params=params, cte=fields.get("content-transfer-encoding", "7bit").strip().lower() or "7bit",
        disposition=disp, filename=filename,
    )
    s.parts.append(part)
    if parent is not None:
        s.parts[parent].children.append(part.index)
    if part.maintype != "multipart":
        return
    boundary = params.get("boundary")
    if not boundary:
        s.defects.append(f"multipart-without-boundary@{start}")
        return
    if depth + 1 > limits.max_depth:
        s.defects.append("nesting-too-deep")
        return
    part.boundary = boundary.encode("latin-1", "replace")
    _children(s, limits, part)


def _content_type(s: Scan, value: str, start: int, parent: int | None) -> tuple[str, dict[str, str]]:
    """(type, parameters); RFC 2045 §5.2 defaults (text/plain, message/rfc822 in a digest), an
    invalid type recorded as a defect."""
    ctype, params = parse_params(value) if value else ("", {})
    if ctype and not _MEDIA_TYPE.fullmatch(ctype):
        s.defects.append(f"invalid-content-type@{start}")
        ctype = "text/plain"
    if not ctype:
        parent_type = s.parts[parent].ctype if parent is not None else ""
        ctype = "message/rfc822" if parent_type == "multipart/digest" else "text/plain"
    return ctype, params


def _children(s: Scan, limits: Limits, part: Part) -> None:
    raw = s.raw
    assert part.boundary is not None
    delim = b"--" + part.boundary
    pos = part.header_end
    body_starts: list[int] = []  # where each child starts (after its delimiter line)
    body_ends: list[int] = []
    closed = False
    while True:
        i = wire.find(raw, delim, pos, part.end)  # a 25 MB attachment is searched a slice at a time
        if i < 0:
            break
        line_end = raw.find(b"\n", i, part.end)
        line_end = part.end if line_end < 0 else line_end + 1
        after = raw[i + len(delim):line_end]
        at_line_start = i == part.header_end or raw[i - 1:i] == b"\n"
        is_close = after.startswith(b"--") and not after[2:].strip()
        if not at_line_start or not (is_close or not after.strip()):
            pos = i + len(delim)
            continue
        # RFC 2046 §5.1.1: the line break before the delimiter is part of the delimiter.
        before = i - 2 if raw[i - 2:i] == b"\r\n" else i - 1 if raw[i - 1:i] == b"\n" else i
        if body_starts:
            body_ends.append(max(before, body_starts[-1]))
        if is_close:
            closed = True
            part.close_at = before
            break
        body_starts.append(line_end)
        pos = line_end
    if not closed:
        s.defects.append(f"missing-close-delimiter@{part.start}")
        if body_starts and len(body_ends) < len(body_starts):
            body_ends.append(part.end)
    if not body_starts:
        s.defects.append(f"multipart-without-parts@{part.start}")
    for b, e in zip(body_starts, body_ends, strict=False):
        _entity(s, limits, b, e, part.index, part.depth + 1)
