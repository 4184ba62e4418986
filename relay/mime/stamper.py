"""Stamp a signature into a message: bytes in, bytes out, plus a decision you can print.

    >>> result = stamp(raw, Signature(html="<p>Alice</p>", text="Alice"))
    >>> result.decision, result.placement
    (Decision(action='stamped', reason=''), 'html:gmail text:attribution')

Only the target text leaves change (decoded, edited, re-encoded with their own transfer
encoding); every other byte — headers, folding, boundaries, preamble, attachments — is copied
as received, and the processed marker is prepended. A message that already carries the marker
is returned unchanged, so ``stamp(stamp(x)) == stamp(x)``.
"""

from __future__ import annotations

import functools
import hashlib
import html as htmllib
import re
from dataclasses import dataclass
from typing import Final

from relay import wire
from relay.mime import codec, headers, placement, trace
from relay.mime.classify import PGP_ARMOUR, classify, find_targets
from relay.mime.scanner import Limits, Part, Scan, line_anomalies, scan
from relay.values import Image, Signature

__all__ = ["DEFAULT_LIMITS", "Decision", "Image", "Signature", "StampResult", "already_processed", "stamp"]

_META_CHARSET: Final = re.compile(
    r"""(<meta\b[^>]*?\bcharset\s*=\s*["']?)([A-Za-z0-9_:.+-]+)""", re.I)
_EOL: Final = re.compile(r"\r\n|\n|\r")
_MAX_LINE: Final = 998  # RFC 5322 §2.1.1
DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True)
class Decision:
    action: str  # "stamped", "marked" (no signature to add) or "pass-through"
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.action}({self.reason})" if self.reason else self.action


@dataclass(frozen=True)
class StampResult:
    pieces: tuple[wire.Piece, ...]  # the output: one bytes, or (a big message) views of the input and insertions
    decision: Decision
    placement: str = ""
    anomalies: tuple[str, ...] = ()  # tolerated oddities worth a log line (bare CR/LF, long lines)
    doubts: tuple[str, ...] = ()  # "html:...: why" when a placement is a guess (stamp --report flags it)
    crlf: bool = False  # proved: every line break in ``data`` is CRLF (see ``stamp``'s ``crlf``)
    dotless: bool = False  # proved: no line of ``data`` starts with a dot (see ``stamp``'s ``dotless``)
    ascii: bool | None = None  # for a message in pieces: whether every octet is US-ASCII (BODY=8BITMIME)

    @functools.cached_property
    def data(self) -> bytes:
        """The output as one ``bytes`` (joined on first use when it is in pieces)."""
        return wire.joined(self.pieces)

    @property
    def size(self) -> int:
        return wire.size_of(self.pieces)


def already_processed(raw: bytes | bytearray, header_name: str, top: dict[str, list[str]] | None = None) -> bool:
    """True when the top-level header already carries the marker (pattern ``true``, any case),
    mirroring the transport rule's exception. One inside an attached message does not count.
    ``top`` is :func:`headers.index` of ``raw`` when the caller already has it."""
    values = (top or headers.index(raw)).get(header_name.lower(), ())
    return any("true" in v.lower() for v in values)


def stamp(  # noqa: PLR0913 -- keyword-only options; the relay passes what ingress already knows
    raw: bytes | bytearray, signature: Signature | None, *, processed_header: str = "X-CodeTwoProcessed",
    mail_from: str | None = None, bottom: bool = False, limits: Limits = DEFAULT_LIMITS, prefix: bytes = b"",
    top: dict[str, list[str]] | None = None, crlf: bool = False, scanned: Scan | None = None,
    dotless: bool = False,
) -> StampResult:
    """``prefix`` (complete header fields, e.g. our Received:) goes first; the output is built
    with a single copy of the message, which matters for 25 MB attachments. ``top`` is
    :func:`headers.index` of ``raw`` when the caller parsed it already (the relay always has).
    ``crlf``: the caller knows every line break in ``raw`` is CRLF (ingress made it so); the
    result's ``crlf`` then says whether the output's still are, proved from what was spliced in
    and where (:func:`_splices_keep_crlf`) instead of scanning 25 MB again before delivery.
    ``dotless``: the caller knows no line of ``raw`` starts with a dot (the DATA reader saw none);
    the result's ``dotless`` says whether that still holds for the output (:func:`_splices_keep_dotless`),
    so delivery's dot-stuffing (RFC 5321 §4.5.2) need not search it.
    ``scanned``: :func:`scan` of ``raw`` with ``limits``, when the caller has it (the pipeline
    shares one between the rules' view of the message and every copy's stamping)."""
    top = headers.index(raw) if top is None else top
    if already_processed(raw, processed_header, top):
        return _out(raw, prefix, [], (crlf, dotless), Decision("pass-through", "already-processed"))
    s = scan(raw, limits, crlf=crlf) if scanned is None else scanned
    fields = prefix + trace.marker(processed_header)
    shows = (_visible_html(signature.html), bool(signature.text.strip())) if signature is not None else (False, False)
    early = _early_decision(s, signature, shows, mail_from, top)
    if early is not None:
        return _out(raw, fields, [], (crlf, dotless), early[0], anomalies=early[1])
    assert signature is not None
    targets = find_targets(s)
    if not targets:
        return _out(raw, fields, [], (crlf, dotless), Decision("pass-through", "no-text-body"))
    if not shows[0]:
        targets.pop("html", None)
    if not shows[1]:
        targets.pop("plain", None)
    if not targets:
        return _out(raw, fields, [], (crlf, dotless), Decision("marked", "no-signature:rendered-empty"))
    try:
        edits, rules, doubts = _edit_targets(s, targets, signature, bottom)
    except _PassThrough as e:
        return _out(raw, fields, [], (crlf, dotless), Decision("pass-through", str(e)))
    return _out(raw, fields, edits, (crlf, dotless), Decision("stamped"), " ".join(rules), _anomalies(s, targets, crlf),
                       tuple(doubts))


def _early_decision(s: Scan, signature: Signature | None, shows: tuple[bool, bool], mail_from: str | None,
                    top: dict[str, list[str]]) -> tuple[Decision, tuple[str, ...]] | None:
    """Why this message gets no signature at all (and the anomalies worth logging), or None.
    ``shows``: whether the signature's HTML and text have anything visible."""
    reason = classify(s, mail_from=mail_from, top=top)
    if reason is not None:
        return Decision("pass-through", reason), tuple(s.anomalies)
    if signature is None:
        return Decision("marked", "no-signature"), ()
    if not any(shows):
        # Every placeholder rendered empty (a sender missing from the directory...): an empty
        # block would only add blank lines; mark the message and say why (issue #9).
        return Decision("marked", "no-signature:rendered-empty"), ()
    if _carries_boundary(signature, s):
        # A rendered signature holding one of the message's boundary lines would end the leaf
        # early and open a part of its own (MIME structure injection, issue #10 finding 3).
        return Decision("pass-through", "signature-contains-boundary"), ()
    return None


def _edit_targets(s: Scan, targets: dict[str, Part], signature: Signature, bottom: bool
                  ) -> tuple[list[tuple[int, int, bytes]], list[str], list[str]]:
    """The edits (start, end, bytes) for the target leaves, their placement rules and doubts.
    Raises _PassThrough when a leaf cannot be edited faithfully."""
    images = _embedded(signature, s) if "html" in targets else []
    if images:
        cids = {img.name: cid for img, cid in images}
        signature = Signature(_CID_REF.sub(lambda m: f"cid:{cids.get(m.group(1), m.group(1))}", signature.html),
                              signature.text)
    edited: dict[str, tuple[bytes, str]] = {}
    doubts: list[str] = []
    plain_rule = None
    for sub in ("plain", "html"):  # plain first: its placement tells whether the HTML needs a text search
        part = targets.get(sub)
        if part is None:
            continue
        try:
            new, rule, doubt = _edit_leaf(s, part, signature, html=sub == "html", bottom=bottom,
                                          textual=_needs_text_search(s, targets, part, plain_rule))
        except codec.DecodeError as e:
            raise _PassThrough(f"undecodable:{e}") from e
        if doubt:
            doubts.append(f"{rule}: {doubt}")
        plain_rule = rule if sub == "plain" else plain_rule
        edited[sub] = (new, rule)
    edits: list[tuple[int, int, bytes]] = []
    rules: list[str] = []
    for sub in ("html", "plain"):
        if sub in edited:
            new, rule = edited[sub]
            rules.append(rule)
            if sub == "html" and images:
                edits += _attach_images(s, targets[sub], new, images)
            else:
                edits.append((targets[sub].start, targets[sub].end, new))
    return edits, rules, doubts


def _needs_text_search(s: Scan, targets: dict[str, Part], part: Part, plain_rule: str | None) -> bool:
    """In multipart/alternative the text part is the same message: no history marker there means
    none in its HTML rendering either, so the (costly) visible-text search of the HTML is skipped;
    structural markers are still looked for. HTML-only mail is always searched."""
    plain = targets.get("plain")
    return not (part.ctype == "text/html" and plain is not None and plain_rule in ("text:end", "text:bottom-posted")
                and plain.parent == part.parent and part.parent is not None
                and s.parts[part.parent].ctype == "multipart/alternative")


def _anomalies(s: Scan, targets: dict[str, Part], crlf: bool) -> tuple[str, ...]:
    """Tolerated oddities worth a log line: the scanner's, plus bare CR/LF (none when ``crlf``:
    ingress made every line break CRLF) and long lines in the unencoded leaves we edited (encoded
    bodies carry their text's line breaks escaped)."""
    out = list(s.anomalies)
    raw_leaves = [p for p in targets.values() if p.cte in ("7bit", "8bit", "binary")]
    if not crlf:
        for p in raw_leaves:
            out += [a for a in line_anomalies(s.raw, p.header_end, p.end) if a not in out]
    if any(codec.line_over(s.body_bytes(p), _MAX_LINE) for p in raw_leaves):
        out.append("long-line")  # in a leaf we re-encoded: our output lines are <= 998
    return tuple(out)


_TAG: Final = re.compile(r"<[^>]*>")


def _visible_html(html: str) -> bool:
    """Would ``html`` show anything: text other than white space (``&nbsp;`` included), or an image?"""
    if re.search(r"<img\b", html, re.I):
        return True
    return bool(htmllib.unescape(_TAG.sub("", html)).strip())


def _carries_boundary(sig: Signature, s: Scan) -> bool:
    boundaries = [p.boundary for p in s.parts if p.boundary]
    if not boundaries:
        return False
    text = (sig.html + "\n" + sig.text).encode("utf-8", "surrogatepass")
    return any(b"--" + b in text for b in boundaries)


PIECES_OVER = wire.CHUNK  # a bigger output goes to delivery in pieces (a module attribute: tests lower it)


def _out(raw: bytes | bytearray, fields: bytes, edits: list[tuple[int, int, bytes]], known: tuple[bool, bool],
         decision: Decision, placement: str = "", anomalies: tuple[str, ...] = (), doubts: tuple[str, ...] = ()
         ) -> StampResult:
    """``known``: (crlf, dotless) as the caller vouches for ``raw``. ``dotless`` is only worked out
    for a message delivery cuts into pieces (:func:`relay.wire.stuffed_pieces`): a smaller one is
    stuffed with one ``replace`` whatever it says, and the proof (15 µs on a 10 KB reply) would be
    spent for nothing."""
    crlf, dotless = known
    big = len(raw) > PIECES_OVER
    crlf = crlf and _splices_keep_crlf(raw, fields, edits)
    chunks = _chunks(raw, fields, edits) if dotless and crlf and big else []
    if not (chunks and _splices_keep_dotless(chunks)):
        return StampResult((_join(raw, fields, edits),), decision, placement, anomalies, doubts, crlf=crlf)
    # A big message that delivery can write as it stands (CRLF only, no dot to add): handed on as
    # views of the input and the pieces put in, not joined into a second 25 MB copy (issue #14:
    # peak memory). Whether it needs BODY=8BITMIME is worked out here, in the big-message thread.
    pieces = tuple(c for c in chunks if len(c))
    ascii = raw.isascii() and all(c.isascii() for c in pieces if not isinstance(c, memoryview))
    return StampResult(pieces, decision, placement, anomalies, doubts, crlf=True, dotless=True, ascii=ascii)


def _splices_keep_dotless(chunks: list[wire.Piece]) -> bool:
    """For :func:`_chunks` of a ``raw`` with no line starting with a dot (no ``CRLF.``, no leading
    dot): whether their join has none either. The output is walked piece by piece, carrying its
    last two octets: an inserted piece is searched whole (a few KB), a view of ``raw`` only where
    it meets what precedes it (inside, it has none)."""
    tail = b"\r\n"  # the output's first line starts a line: a leading dot counts
    for chunk in chunks:
        head = bytes(chunk[:2]) if isinstance(chunk, memoryview) else bytes(chunk)
        if b"\r\n." in tail + head:
            return False
        tail = (tail + bytes(chunk[-2:]))[-2:]
    return True


def _splices_keep_crlf(raw: bytes | bytearray, fields: bytes, edits: list[tuple[int, int, bytes]]) -> bool:
    """For a CRLF-only ``raw``: whether :func:`_join`'s output is CRLF-only too. It is when every
    piece put in is, and no cut falls between the CR and the LF of a pair (which would leave a
    bare CR before the piece or a bare LF after it). The pieces are our header fields and the
    edited leaves: a few KB next to a 25 MB attachment that is not looked at again."""
    if not wire.crlf_only(fields):
        return False
    for start, end, new in edits:
        if not wire.crlf_only(new):
            return False
        if any(0 < p < len(raw) and raw[p - 1:p + 1] == b"\r\n" for p in (start, end)):
            return False
    return True


def _join(raw: bytes | bytearray, fields: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """``fields`` + ``raw`` with ``edits`` (start, end, replacement) applied, copying ``raw`` once:
    memoryview slices are not copies, and bytes.join sizes the result up front."""
    if not fields and not edits:
        return raw if isinstance(raw, bytes) else bytes(raw)
    return b"".join(_chunks(raw, fields, edits))


def _chunks(raw: bytes | bytearray, fields: bytes, edits: list[tuple[int, int, bytes]]) -> list[wire.Piece]:
    """What :func:`_join` joins: ``fields``, then views of ``raw`` between the edits' replacements."""
    eol = headers.line_ending(raw)
    if eol != b"\r\n":
        fields = fields.replace(b"\r\n", eol)
    view = memoryview(raw)
    chunks: list[wire.Piece] = [fields]
    pos = 0
    for start, end, new in sorted(edits):
        chunks += [view[pos:start], new]
        pos = end
    chunks.append(view[pos:])
    return chunks


class _PassThrough(Exception):
    pass


_CID_REF: Final = re.compile(r"""cid:([^"'\s>]+)""")


def _embedded(sig: Signature, s: Scan) -> list[tuple[Image, str]]:
    """Images the HTML actually references, each with a Content-ID that is deterministic (same
    image, same id: golden tests and retries agree) and does not collide with the message's."""
    used = set(_CID_REF.findall(sig.html)) if sig.images else set()
    if not used:
        return []
    existing = {v.strip("<> ").lower() for p in s.parts for v in [_content_id(s, p)] if v}
    out = []
    for img in sig.images:
        if img.name not in used:
            continue
        digest = hashlib.sha256(img.data).hexdigest()[:12]
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", img.name)
        cid, n = f"{safe}.{digest}@signature-relay", 1
        while cid.lower() in existing:
            n += 1
            cid = f"{safe}.{digest}.{n}@signature-relay"
        existing.add(cid.lower())
        out.append((img, cid))
    return out


def _content_id(s: Scan, p: Part) -> str | None:
    for f in headers.fields(s.header_bytes(p) or b"\r\n"):
        if f.name.lower() == "content-id":
            return f.value
    return None


def _image_part(img: Image, cid: str, eol: bytes) -> bytes:
    name = re.sub(r'["\\\r\n]', "_", img.name)
    head = (f'Content-Type: {img.content_type}; name="{name}"', "Content-Transfer-Encoding: base64",
            f"Content-ID: <{cid}>", f'Content-Disposition: inline; filename="{name}"')
    return eol.join(h.encode("ascii", "replace") for h in head) + eol + eol + codec.encode_base64(img.data, eol)


def _attach_images(s: Scan, part: Part, new_leaf: bytes, images: list[tuple[Image, str]]
                   ) -> list[tuple[int, int, bytes]]:
    """Edits that put the edited HTML leaf and the images in one ``multipart/related``
    (RFC 2387): into the existing one, or a new one wrapping the leaf."""
    eol = headers.line_ending(s.raw)
    parts = [_image_part(img, cid, eol) for img, cid in images]
    parent = s.parts[part.parent] if part.parent is not None else None
    if parent is not None and parent.ctype == "multipart/related" and parent.close_at is not None:
        assert parent.boundary is not None
        delim = eol + b"--" + parent.boundary + eol
        # Before the close delimiter (whose own leading line break stays in place).
        return [(part.start, part.end, new_leaf),
                (parent.close_at, parent.close_at, b"".join(delim + p.rstrip(b"\r\n") for p in parts))]
    # Deterministic (stamping twice gives the same bytes); uniqueness is checked just below. Hashed:
    # the message up to the end of the leaf, so what comes after it (a 25 MB attachment still
    # arriving) does not change the boundary, and a cut-through's head is the stored copy's
    # (relay/cutthrough.py). A long stretch is hashed by its ends and length: sha256 of 25 MB
    # costs 60 ms.
    h = hashlib.sha256()
    if part.end <= 1 << 20:
        h.update(s.raw[:part.end])
    else:  # without building the slice (1 MB more memory at peak)
        with memoryview(s.raw) as view:
            h.update(view[:1 << 19])
            h.update(view[part.end - (1 << 19):part.end])
        h.update(b"%d" % part.end)
    digest = h.hexdigest()[:16]
    boundary, n = f"=_signature-relay_{digest}", 0
    while wire.find(s.raw, boundary.encode()) >= 0:  # RFC 2046 §5.1.1: must not occur in the encapsulated parts
        n += 1
        boundary = f"=_signature-relay_{digest}_{n}"
    b = boundary.encode("ascii")
    related_ct = f'Content-Type: multipart/related;{eol.decode()}\tboundary="{boundary}";{eol.decode()}' \
                 f'\ttype="text/html"'.encode("ascii") + eol
    hend = headers.header_end(new_leaf)  # the edited header may be longer (charset, CTE changed)
    leaf_header, leaf_body = new_leaf[:hend], new_leaf[hend:]
    if part.parent is None:
        # The leaf is the whole message: Content-* fields move into the inner part, all other
        # fields stay where they are, byte for byte.
        outer = b"".join(new_leaf[f.start:f.end] for f in headers.fields(leaf_header)
                         if not f.name.lower().startswith("content-"))
        inner = b"".join(new_leaf[f.start:f.end] for f in headers.fields(leaf_header)
                         if f.name.lower().startswith("content-")) or b"Content-Type: text/html" + eol
        mime = b"" if any(f.name.lower() == "mime-version" for f in headers.fields(leaf_header)) \
            else b"MIME-Version: 1.0" + eol
        body_sep = eol
    else:
        outer, inner, mime, body_sep = b"", leaf_header[: len(leaf_header) - len(eol)], b"", eol
    trailing = eol if part.parent is None else b""
    # The leaf's bytes are kept whole, its final line break included: the line break before our
    # delimiter belongs to the delimiter (RFC 2046 §5.1.1), not to the leaf.
    wrapped = (outer + mime + related_ct + eol + b"--" + b + eol + inner + body_sep + leaf_body
               + b"".join(eol + b"--" + b + eol + p.rstrip(b"\r\n") for p in parts)
               + eol + b"--" + b + b"--" + trailing)
    return [(part.start, part.end, wrapped)]


def _edit_leaf(s: Scan, part: Part, sig: Signature, *, html: bool, bottom: bool, textual: bool = True
               ) -> tuple[bytes, str, str]:
    """One leaf with the signature inserted: (new part bytes, placement rule, doubt)."""
    raw = s.raw
    header, body = s.header_bytes(part), s.body_bytes(part)
    data = codec.decode_transfer(body, part.cte)
    # The literal first (StringZilla, 0.7 µs on a 10 KB leaf): the expression's own scan takes 6.6.
    if wire.find(data, b"-----BEGIN PGP ") >= 0 and PGP_ARMOUR.search(data):
        raise _PassThrough("pgp-inline")
    text = codec.decode_text(data, part.charset)
    wire_eol = headers.line_ending(raw).decode("ascii")  # every encoded line ends with it
    if html:
        utf8 = data if codec.python_charset(part.charset) == "utf-8" else None
        where = placement.find_html(text, bottom=bottom, utf8=utf8, textual=textual)
        eol = _local_eol(text, where.offset, wire_eol)
        html_sig = _EOL.sub(eol, sig.html)  # the line breaks of the text around it (RFC 2045 §2.10)
        block = f'<div class="signature-relay">{html_sig}</div>{eol}'
    else:
        where = placement.find_text(text, bottom=bottom)
        block = _text_insertion(text, where.offset, sig.text, _local_eol(text, where.offset, wire_eol),
                                flowed=part.params.get("format", "").lower() == "flowed")
    spliced = _splice(body, part.cte, text, where.offset, block, part.charset, wire_eol)
    if spliced is not None:
        return header + spliced, where.rule, where.doubt
    new_text = text[:where.offset] + block + text[where.offset:]
    return _reencode(header, body, part, new_text, html, wire_eol), where.rule, where.doubt


def _text_insertion(text: str, offset: int, sig_text: str, eol: str, *, flowed: bool) -> str:
    """The plain-text block to insert at ``offset``: separated from the newest text above and from
    the quoted history below by a blank line."""
    block = _text_block(sig_text, eol, flowed=flowed)
    before = text[:offset]
    if before and not before.endswith("\n"):
        block = eol + eol + block  # signature at the end of a body without final newline
    elif before and not before.endswith(eol + eol) and not before.endswith("\n\n"):
        block = eol + block
    if offset < len(text):
        block += eol  # a blank line between signature and the quoted history
    return block


def _reencode(header: bytes, body: bytes, part: Part, new_text: str, html: bool, wire_eol: str) -> bytes:
    """Full re-encode: the signature needs another charset or transfer encoding, or the leaf is
    base64 (not splice-able) or its encoded lines do not map onto its decoded lines."""
    charset = part.charset
    py = codec.python_charset(charset)
    try:
        if not codec.ascii_compatible(py):
            raise UnicodeEncodeError(py, "", 0, 0, "not ASCII-compatible: rewrite as UTF-8")
        new_data = new_text.encode(py)
    except UnicodeEncodeError:
        # The signature does not fit the leaf's charset: the whole leaf becomes UTF-8.
        charset, py = "utf-8", "utf-8"
        if html:
            new_text = _META_CHARSET.sub(lambda m: m.group(1) + "utf-8", new_text)
        new_data = new_text.encode("utf-8")
    cte = part.cte
    if cte in ("7bit", "8bit") and ((cte == "7bit" and not new_data.isascii()) or codec.line_over(new_data, _MAX_LINE)):
        cte = "quoted-printable"  # RFC 2045 §2.7/2.8: 7bit is ASCII, no line over 998
    if cte == "quoted-printable":
        new_body = codec.encode_qp(new_text, py, wire_eol)
    elif cte == "base64":
        new_body = codec.encode_base64(new_data, wire_eol.encode())
        if not body.endswith(b"\n"):
            new_body = new_body.rstrip(b"\r\n")
    else:
        new_body = new_data
    if charset != part.charset:
        header = _set_charset(header, charset or "utf-8", top=part.parent is None)
    if cte != part.cte:
        header = _set_field(header, "Content-Transfer-Encoding", cte, top=part.parent is None)
    return header + new_body


def _splice(body: bytes, cte: str, text: str, offset: int, block: str, charset: str | None,
            wire_eol: str = "\r\n") -> bytes | None:
    """Insert ``block`` into the *encoded* body, re-encoding only the line it lands in, so every
    other byte of the leaf stays as received. None when that cannot be done faithfully."""
    py = codec.python_charset(charset)
    if not codec.ascii_compatible(py):
        return None
    try:
        ins = block.encode(py)
    except UnicodeEncodeError:
        return None
    if cte in ("7bit", "8bit", "binary"):
        if cte == "7bit" and not ins.isascii():
            return None
        head = text[:offset].encode(py)
        if not body.startswith(head):
            return None  # the charset does not round-trip these bytes
        new = head + ins + body[len(head):]
        if cte != "binary" and codec.line_over(new, _MAX_LINE):
            return None
        return new
    if cte != "quoted-printable":
        return None
    # Hard line breaks of the encoded body: an end of line not preceded by "=" (a soft break).
    soft = b"=\r\n" if body.find(b"\r\n") >= 0 else b"=\n"  # the body's own line ending
    # wire.COUNT, not bytes.count: 0.3 against 10 µs for the soft breaks of a 10 KB body (see wire.FIND).
    hard_total = wire.COUNT(body, b"\n", 0, len(body)) - wire.COUNT(body, soft, 0, len(body))
    k = text.count("\n", 0, offset)
    if hard_total != text.count("\n") or k > hard_total:
        return None  # encoded and decoded lines do not correspond (e.g. "=0D=0A" in the body)
    enc_start, enc_end = _qp_line_span(body, k, hard_total)
    line_start = text.rfind("\n", 0, offset) + 1
    line_end = text.find("\n", offset)
    line_end = len(text) if line_end < 0 else line_end
    line = text[line_start:line_end]
    line = line[:-1] if line.endswith("\r") else line
    col = offset - line_start
    if col > len(line):
        return None
    edited = line[:col] + block + line[col:]
    new_line = codec.encode_qp(edited, py, wire_eol)
    # Verify on the one line we touch: the old encoded line must decode to exactly the text line
    # we edited (so the span is right), and the new one to exactly the edited line. Every other
    # byte of the body is kept, so the whole leaf then decodes to the text we meant.
    try:
        ok = (codec.decode_text(codec.decode_transfer(body[enc_start:enc_end], "quoted-printable"), charset) == line
              and codec.decode_text(codec.decode_transfer(new_line, "quoted-printable"), charset) == edited)
    except codec.DecodeError:
        ok = False
    return body[:enc_start] + new_line + body[enc_end:] if ok else None


def _is_soft(body: bytes, nl: int) -> bool:
    """Is the line break whose "\\n" is at ``nl`` a soft one ("=" right before it)?"""
    j = nl - 1 if nl and body[nl - 1] == 0x0D else nl
    return j > 0 and body[j - 1] == 0x3D


def _qp_line_span(body: bytes, k: int, hard_total: int) -> tuple[int, int]:
    """Byte span of hard line ``k`` (0-based, without its line break) of a quoted-printable body.
    A line ending in "=" ends with a soft break (RFC 2045 §6.7 rule 5); trailing white space
    after the "=" is not recognised here, and the caller verifies the splice by decoding it, so a
    miss costs a full re-encode, never correctness. Scans from the nearer end: signatures go
    near the top (under a reply) or at the very end."""
    if k <= hard_total // 2:
        start, seen, pos = 0, 0, body.find(b"\n")
        while pos >= 0:
            if not _is_soft(body, pos):
                if seen == k:
                    return start, pos - 1 if pos and body[pos - 1] == 0x0D else pos
                seen += 1
                start = pos + 1
            pos = body.find(b"\n", pos + 1)
        return start, len(body)
    end, idx, pos = len(body), hard_total - 1, body.rfind(b"\n")
    while pos >= 0:
        if not _is_soft(body, pos):
            if idx + 1 == k:  # hard break number idx ends line idx and opens line idx + 1
                return pos + 1, end
            idx -= 1
            end = pos - 1 if pos and body[pos - 1] == 0x0D else pos
        pos = body.rfind(b"\n", 0, pos)
    return 0, end


def _text_block(sig: str, eol: str, *, flowed: bool) -> str:
    lines = sig.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n").split("\n")
    if flowed:
        # RFC 3676 §4.2/4.4: no trailing space (it would mean "flows on"), stuff risky starts.
        lines = [("" if not ln.rstrip(" ") else (" " if ln.startswith((" ", ">", "From ")) else ""))
                 + ln.rstrip(" ") for ln in lines]
    return eol.join(lines) + eol


def _local_eol(text: str, offset: int, default: str) -> str:
    """The line break of the text around ``offset`` (the line above, else the line below), so an
    inserted block matches its neighbours even in a leaf that mixes CRLF and LF (issue #9)."""
    before = text.rfind("\n", 0, offset)
    if before >= 0:
        return "\r\n" if before and text[before - 1] == "\r" else "\n"
    after = text.find("\n", offset)
    if after >= 0:
        return "\r\n" if after and text[after - 1] == "\r" else "\n"
    return default


# ``charset=...`` or the RFC 2231 form ``charset*=utf-8''...`` (group 2 = name suffix, 3 = value).
_CHARSET_PARAM: Final = re.compile(
    rb';([ \t]|\r?\n[ \t])*charset(\*?)[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^;\s]*)', re.I)


def _set_charset(header: bytes, charset: str, *, top: bool) -> bytes:
    """Set the ``charset`` parameter of the leaf's Content-Type in place: only the value's bytes
    change; every other parameter, its quoting, the folding and the order stay as written
    (issue #9). Without a Content-Type the leaf is text/plain (RFC 2045 §5.2)."""
    eol = headers.line_ending(header) if header else b"\r\n"
    field = next((f for f in headers.fields(header + eol) if f.name.lower() == "content-type"), None)
    if field is None:
        return _set_field(header, "Content-Type", f"text/plain; charset={charset}", top=top)
    raw = header[field.start:field.end]
    for m in _CHARSET_PARAM.finditer(raw):
        colon = raw.find(b":")
        if _quotes_before(raw[colon + 1:m.start()]) % 2 == 0:  # outside a quoted string
            value = m.group(3)
            new = b'"' + charset.encode("ascii") + b'"' if value.startswith(b'"') else charset.encode("ascii")
            if m.group(2):  # RFC 2231 extended value: becomes a plain one, the name loses its "*"
                raw = raw[:m.start(2)] + b"=" + new + raw[m.end(3):]
            else:
                raw = raw[:m.start(3)] + new + raw[m.end(3):]
            return header[:field.start] + raw + header[field.end:]
    end = len(raw) - (2 if raw.endswith(b"\r\n") else 1 if raw.endswith(b"\n") else 0)
    raw = raw[:end] + b"; charset=" + charset.encode("ascii") + raw[end:]
    return header[:field.start] + raw + header[field.end:]


def _quotes_before(data: bytes) -> int:
    """Unescaped double quotes in ``data``: odd means a position after it is inside a quoted string."""
    return len(re.findall(rb'(?<!\\)"', data))


def _set_field(header: bytes, name: str, value: str, *, top: bool) -> bytes:
    """Replace (or add) one field of a leaf's header; every other field keeps its bytes."""
    eol = headers.line_ending(header) if header else b"\r\n"
    line = f"{name}: {value}".encode("ascii") + eol
    for f in headers.fields(header + eol):
        if f.name.lower() == name.lower():
            return header[:f.start] + line + header[f.end:]
    # Absent: add it just before the empty line ending the header.
    body_sep = len(header) - (2 if header.endswith(b"\r\n\r\n") else 1 if header.endswith(b"\n\n") else 0)
    if not header.strip():
        return line + (header or eol)
    extra = line
    if top and not any(f.name.lower() == "mime-version" for f in headers.fields(header + eol)):
        extra = b"MIME-Version: 1.0" + eol + line  # RFC 2045 §4: needed for charset/CTE to count
    return header[:body_sep] + extra + header[body_sep:]
