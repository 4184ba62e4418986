"""Issue #9, wire correctness: five defects real-world mail found in the stamper's output. Each
test failed before its fix."""

from __future__ import annotations

import base64
import binascii
import re

from relay.mime import codec, scanner
from relay.mime.stamper import Image, Signature, stamp

SIG = Signature(html="<p>Alice Wilber · Sales</p>\n", text="Alice Wilber · Sales\n")
PNG = Image("logo.png", "image/png", b"\x89PNG\r\n\x1a\nfake")


def leaf(out: bytes, ctype: str) -> tuple[scanner.Scan, scanner.Part]:
    s = scanner.scan(out.split(b"\r\n", 1)[1])  # without our marker line
    return s, next(p for p in s.parts if p.ctype == ctype)


def decoded(s: scanner.Scan, p: scanner.Part) -> str:
    return codec.decode_text(codec.decode_transfer(s.body_bytes(p), p.cte), p.charset)


def bare_line_breaks(data: bytes | bytearray) -> int:
    return data.replace(b"\r\n", b"").count(b"\n") + data.replace(b"\r\n", b"").count(b"\r")


# 1. bare LF on the wire ------------------------------------------------------------------------------

def alternative(plain_body: bytes, html_body: bytes, cte: str = "base64", charset: str = "utf-8") -> bytes:
    return (b"From: a@contoso.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/alternative; boundary=BB\r\n\r\n"
            b"--BB\r\nContent-Type: text/plain; charset=" + charset.encode() + b"\r\n"
            b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n" + plain_body + b"\r\n"
            b"--BB\r\nContent-Type: text/html; charset=" + charset.encode() + b"\r\n"
            b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n" + html_body + b"\r\n--BB--\r\n")


def b64(text: str) -> bytes:
    return base64.encodebytes(text.encode()).replace(b"\n", b"\r\n").rstrip(b"\r\n")


def test_base64_leaf_with_lf_text_is_written_with_crlf_lines() -> None:
    raw = alternative(b64("Hi Bob,\nsee you.\n\nOn Mon, Bob wrote:\n> hi\n"),
                      b64("<html><body>\n<p>Hi Bob</p>\n</body></html>\n"))
    r = stamp(raw, SIG)
    assert r.decision.action == "stamped"
    assert bare_line_breaks(r.data) == 0


def test_qp_leaf_with_encoded_lf_is_written_with_crlf_lines() -> None:
    raw = alternative(b"Hi Bob,=0Asee you.=0A=0AOn Mon, Bob wrote:=0A> hi=0A",
                      b"<html><body>=0A<p>Hi Bob</p>=0A</body></html>=0A", cte="quoted-printable")
    r = stamp(raw, SIG)
    assert r.decision.action == "stamped"
    assert bare_line_breaks(r.data) == 0


# 3. mixed line breaks are kept, line by line ----------------------------------------------------------

def test_mixed_line_breaks_keep_each_lines_own_break() -> None:
    text = "Hi Bob,\r\nsee you.\n\nthanks\r\n"
    raw = alternative(b64(text), b64("<html><body>\r\n<p>Hi</p>\n</body></html>\r\n"))
    r = stamp(raw, SIG)
    s, p = leaf(r.data, "text/plain")
    out = decoded(s, p)
    assert out.startswith(text)  # every original line keeps its own break
    qp = alternative(b"Hi Bob,=0D=0Asee you.=0A=0Athanks=0D=0A", b"<p>Hi</p>", cte="quoted-printable")
    s, p = leaf(stamp(qp, SIG).data, "text/plain")
    assert decoded(s, p).startswith(text)
    assert bare_line_breaks(s.raw) == 0


# 2. the wrapped HTML leaf keeps its final line break ------------------------------------------------

def test_wrapping_in_multipart_related_keeps_the_leafs_final_line_break() -> None:
    html = b"<html><body><p>Hi</p></body></html>\r\n"  # content ends in CRLF: "\r\n\r\n--BB" below
    raw = (b"From: a@contoso.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/alternative; boundary=BB\r\n\r\n"
           b"--BB\r\nContent-Type: text/plain\r\n\r\nHi\r\n"
           b"--BB\r\nContent-Type: text/html\r\n\r\n" + html + b"\r\n--BB--\r\n")
    sig = Signature(html='<p><img src="cid:logo.png"> Alice</p>\n', text="Alice\n", images=(PNG,))
    r = stamp(raw, sig)
    s, p = leaf(r.data, "text/html")
    assert s.parts[p.parent or 0].ctype == "multipart/related"
    assert s.body_bytes(p).endswith(b"</html>\r\n")


# 4. an empty signature is never inserted -----------------------------------------------------------

def test_empty_rendered_signature_inserts_nothing_and_says_why() -> None:
    raw = alternative(b"Hi", b"<p>Hi</p>", cte="7bit", charset="us-ascii")
    empty = Signature(html='<div style="x">\n  <p> </p>&nbsp;<br>\n</div>\n', text="\n \n")
    r = stamp(raw, empty)
    assert (r.decision.action, r.decision.reason) == ("marked", "no-signature:rendered-empty")
    assert r.data == b"X-CodeTwoProcessed: true\r\n" + raw
    # one part empty, the other not: only the non-empty one is inserted
    half = stamp(raw, Signature(html="<p>Alice</p>\n", text="\n"))
    s, p = leaf(half.data, "text/plain")
    assert half.decision.action == "stamped" and s.body_bytes(p) == b"Hi"
    assert b"<p>Alice</p>" in half.data


# 5. charset rewrite keeps every other parameter byte for byte ----------------------------------------

def test_charset_rewrite_keeps_the_other_parameters_as_written() -> None:
    ct = b'Content-Type: text/plain;\r\n\tformat="flowed"; DelSp=yes; x-note="a;b";\r\n charset=us-ascii; x-tail=1'
    raw = b"From: a@contoso.com\r\nMIME-Version: 1.0\r\n" + ct + b"\r\n\r\nHi Bob\r\n"
    r = stamp(raw, Signature(html="<p>Zoë</p>", text="Zoë — Sales\n"))
    s, p = leaf(r.data, "text/plain")
    header = s.header_bytes(p)
    new_ct = re.search(rb"Content-Type:.*?(?=\r\n(?![ \t]))", header, re.S)
    assert new_ct is not None
    assert new_ct.group(0) == ct.replace(b"charset=us-ascii", b"charset=utf-8")
    assert decoded(s, p).startswith("Hi Bob")


def test_charset_added_when_absent_keeps_the_rest() -> None:
    ct = b'Content-Type: text/plain; format="flowed"'
    raw = b"From: a@contoso.com\r\nMIME-Version: 1.0\r\n" + ct + b"\r\n\r\nHi Bob\r\n"
    r = stamp(raw, Signature(html="<p>Zoë</p>", text="Zoë\n"))
    s, p = leaf(r.data, "text/plain")
    assert s.header_bytes(p).startswith(b"From: a@contoso.com\r\nMIME-Version: 1.0\r\n" + ct + b"; charset=")


def test_qp_bare_lf_escape_decodes_back() -> None:
    enc = codec.encode_qp("a\nb\r\nc\rd", "utf-8", "\r\n")
    assert bare_line_breaks(enc) == 0
    assert binascii.a2b_qp(enc).decode() == "a\nb\r\nc\rd"


def test_rfc2231_charset_is_rewritten_in_place() -> None:
    ct = b"Content-Type: text/plain; charset*=ansi-x3.4-1968''us-ascii; format=flowed"
    raw = b"From: a@contoso.com\r\nMIME-Version: 1.0\r\n" + ct + b"\r\n\r\nHi Bob\r\n"
    s, p = leaf(stamp(raw, Signature(html="<p>Zoë</p>", text="Zoë\n")).data, "text/plain")
    assert b"Content-Type: text/plain; charset=utf-8; format=flowed\r\n" in s.header_bytes(p)
    assert p.charset == "utf-8" and "Zoë" in decoded(s, p)
