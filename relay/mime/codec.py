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
import re
from typing import Final

_B64_OK: Final = re.compile(rb"^[A-Za-z0-9+/=\s]*$")
_EOL: Final = re.compile(r"\r\n|\n|\r")


class DecodeError(Exception):
    """The leaf cannot be decoded faithfully: the stamper passes the message through."""


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


def _qp_char(ch: str, codec: str, eol_next: bool) -> str:
    if ch == " " or ch == "\t":
        return f"={ord(ch):02X}" if eol_next else ch
    if ch == "=" or not " " < ch < "\x7f":
        return "".join(f"={b:02X}" for b in ch.encode(codec))
    return ch


def encode_qp(text: str, codec: str, eol: str = "\r\n") -> bytes:
    """Quoted-printable for ``text`` in ``codec`` (ASCII-compatible), hard line breaks as ``eol``."""
    if not ascii_compatible(codec):
        raise ValueError(f"{codec} is not ASCII-compatible")
    out: list[str] = []
    for line in _EOL.split(text):
        tokens = [_qp_char(ch, codec, i == len(line) - 1) for i, ch in enumerate(line)]
        if tokens and (line.startswith("From ") or line.startswith(".")):
            tokens[0] = f"={ord(line[0]):02X}"
        cur = ""
        for tok in tokens:
            # 76 columns including the "=" of a soft break (RFC 2045 §6.7 rule 5).
            if len(cur) + len(tok) > 75:
                out.append(cur + "=")
                cur = ""
            cur += tok
        out.append(cur)
    return eol.join(out).encode("ascii")


def max_line(data: bytes) -> int:
    return max((len(line) for line in data.split(b"\n")), default=0)
