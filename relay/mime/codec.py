"""Decode and re-encode one leaf body (transfer encoding + charset). Pure.

Encoders are written for mail, not borrowed from ``quopri``/``email``:

* quoted-printable (RFC 2045 §6.7): lines ≤ 76; a soft break never splits the bytes of one
  character (alterMIME's bug, which breaks UTF-8 in many clients); trailing white space encoded;
  a line starting with "From " or "." gets its first character encoded, so mbox "From " munging
  and SMTP dot handling can never touch it.
* base64 (RFC 2045 §6.8): 76-character lines.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import re
from typing import Final

from relay import wire

_B64_OK: Final = re.compile(rb"^[A-Za-z0-9+/=\s]*$")
_EOL: Final = re.compile(r"\r\n|\n|\r")


class DecodeError(Exception):
    """The leaf cannot be decoded faithfully: the stamper passes the message through."""


@functools.lru_cache(maxsize=512)
def python_charset(charset: str | None) -> str:
    """Map a MIME charset to a Python codec name; raise DecodeError if unknown."""
    cs = (charset or "us-ascii").strip().strip('"').lower()
    aliases = {"us-ascii": "ascii", "ascii": "ascii", "utf8": "utf-8", "x-unknown": "ascii",
               "unicode-1-1-utf-7": "utf-7"}
    cs = aliases.get(cs, cs)
    try:
        return codecs.lookup(cs).name
    except LookupError as e:
        raise DecodeError(f"unknown charset {charset!r}") from e


_PRINTABLE: Final = "".join(chr(c) for c in range(32, 127)) + "\t\r\n"


@functools.lru_cache(maxsize=512)
def ascii_compatible(codec_name: str) -> bool:
    """True when every printable ASCII character encodes to itself (not UTF-16/32, not UTF-7),
    which the character-wise quoted-printable encoder and our markers rely on."""
    try:
        return _PRINTABLE.encode(codec_name) == _PRINTABLE.encode("ascii")
    except (UnicodeError, LookupError):
        return False


def decode_transfer(body: bytes, cte: str) -> bytes:
    if cte in ("7bit", "8bit", "binary"):
        return body
    if cte == "quoted-printable":
        return binascii.a2b_qp(body)
    if cte == "base64":
        if not _B64_OK.match(body):
            raise DecodeError("invalid characters in base64 body")
        compact = re.sub(rb"\s+", b"", body)
        if len(compact.rstrip(b"=")) % 4 == 1:
            raise DecodeError("truncated base64 body")
        try:
            return binascii.a2b_base64(compact + b"=" * (-len(compact) % 4))
        except binascii.Error as e:
            raise DecodeError(f"bad base64: {e}") from e
    raise DecodeError(f"unknown transfer encoding {cte!r}")


def decode_text(data: bytes, charset: str | None) -> str:
    codec = python_charset(charset)
    try:
        return data.decode(codec)
    except UnicodeDecodeError as e:
        raise DecodeError(f"body is not valid {charset or 'us-ascii'}") from e


def encode_base64(data: bytes, eol: bytes = b"\r\n") -> bytes:
    b = binascii.b2a_base64(data, newline=False)
    return eol.join(b[i:i + 76] for i in range(0, len(b), 76)) + eol


_SAFE_LINE: Final = re.compile(rb"[\x21-\x3c\x3e-\x7e]([\x20\x21-\x3c\x3e-\x7e]{0,74}[\x21-\x3c\x3e-\x7e])?")
_SINGLE_BYTE_PREFIXES: Final = ("ascii", "latin", "iso8859", "cp125", "cp437", "cp850", "cp852", "cp866", "koi8",
                                "mac-", "tis-620", "cp874")


def _fast_qp_ok(codec: str) -> bool:
    """Charsets where a character boundary is visible in the bytes: single-byte ones (every byte
    is a character) and UTF-8 (continuation bytes are 0x80-0xBF)."""
    return codec == "utf-8" or codec.startswith(_SINGLE_BYTE_PREFIXES)


_BREAKS: Final = re.compile(r"(\r\n|\n|\r)")


def encode_qp(text: str, codec: str, eol: str = "\r\n") -> bytes:
    """Quoted-printable for ``text`` in ``codec`` (ASCII-compatible). ``eol`` is the message's
    line ending on the wire: every encoded line ends with it, whatever ``text`` uses.

    A line break of ``text`` equal to ``eol`` becomes a hard line break (RFC 2045 §6.7 rule 4);
    any other one (a bare LF in CRLF mail, typical of web clients) is kept *as data*: escaped
    (``=0A``) and followed by a soft break, so the decoded text keeps each line's own break and
    the wire never carries a bare LF (issue #9: receivers refuse bare LF since the 2023
    smuggling disclosures)."""
    if not ascii_compatible(codec):
        raise ValueError(f"{codec} is not ASCII-compatible")
    fast, utf8 = _fast_qp_ok(codec), codec == "utf-8"
    pieces = _BREAKS.split(text)
    out: list[bytes] = []
    for i in range(0, len(pieces), 2):
        phys = _qp_line(pieces[i], codec, fast, utf8)
        sep = pieces[i + 1] if i + 1 < len(pieces) else None
        if sep is not None and sep != eol:
            esc = b"".join(b"=%02X" % c for c in sep.encode("ascii")) + b"="
            if len(phys[-1]) + len(esc) > 76:
                phys[-1] += b"="
                phys.append(esc)
            else:
                phys[-1] += esc
        out.extend(phys)
    return eol.encode("ascii").join(out)


def _qp_line(line: str, codec: str, fast: bool, utf8: bool) -> list[bytes]:
    """One line of text (no line break in it) as one or more encoded lines (soft breaks)."""
    if not fast:
        return _encode_qp_by_char(line, codec)
    data = line.encode(codec)
    if len(data) <= 76 and (not data or _SAFE_LINE.fullmatch(data)) and not data.startswith((b"From ", b".")):
        return [data]  # the common case: nothing to encode, nothing to wrap
    # binascii does the byte escaping in C (including trailing white space); we undo its
    # wrapping, which may split a UTF-8 sequence, and wrap again on character boundaries.
    enc = binascii.b2a_qp(data, quotetabs=False, istext=False, header=False).replace(b"=\n", b"")
    if enc.startswith((b"From ", b".")):
        enc = b"=%02X" % enc[0] + enc[1:]
    return _wrap(enc, utf8)


def _wrap(enc: bytes, utf8: bool) -> list[bytes]:
    """Soft line breaks (RFC 2045 §6.7 rule 5): at most 76 columns including the "=", never inside
    an "=XX" escape, and (UTF-8) never between the bytes of one character."""
    lines: list[bytes] = []
    start = 0
    while len(enc) - start > 76:
        cut = start + 75
        if enc[cut - 1] == 0x3D:  # "=" just before the cut: keep "=XX" whole
            cut -= 1
        elif enc[cut - 2] == 0x3D:
            cut -= 2
        if utf8:
            while cut - 3 > start and enc[cut] == 0x3D and 0x80 <= int(enc[cut + 1:cut + 3], 16) <= 0xBF:
                cut -= 3  # the next byte continues a character: break before its lead byte
        lines.append(enc[start:cut] + b"=")
        start = cut
    lines.append(enc[start:])
    return lines


def _qp_char(ch: str, codec: str, eol_next: bool) -> str:
    if ch == " " or ch == "\t":
        return f"={ord(ch):02X}" if eol_next else ch
    if ch == "=" or not " " < ch < "\x7f":
        return "".join(f"={b:02X}" for b in ch.encode(codec))
    return ch


def _encode_qp_by_char(line: str, codec: str) -> list[bytes]:
    """Slow path for multi-byte charsets (Shift_JIS, GB18030, Big5, EUC-*): one character at a
    time, so a soft break can only fall between characters."""
    tokens = [_qp_char(ch, codec, i == len(line) - 1) for i, ch in enumerate(line)]
    if tokens and (line.startswith("From ") or line.startswith(".")):
        tokens[0] = f"={ord(line[0]):02X}"
    out: list[str] = []
    cur = ""
    for tok in tokens:
        if len(cur) + len(tok) > 75:
            out.append(cur + "=")
            cur = ""
        cur += tok
    out.append(cur)
    return [x.encode("ascii") for x in out]


def line_over(data: bytes, n: int) -> bool:
    """Whether a line (with its CR, if any) is longer than ``n`` octets, without splitting a
    25 MB leaf into lines (:func:`relay.wire.line_longer_than`)."""
    return wire.line_longer_than(data, n, sep=b"\n")
