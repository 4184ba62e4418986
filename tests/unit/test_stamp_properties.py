"""Hypothesis properties of the stamper on generated MIME messages and on arbitrary bytes."""

from __future__ import annotations

import base64
import quopri

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.mime.stamper import Signature, stamp
from tests.unit import invariants

SIG = Signature(html="<p>Alice Wilber · Sales — ☎ +1 425</p>", text="Alice Wilber · Sales — ☎ +1 425")
PROBE_HTML, PROBE_TEXT = "Alice Wilber · Sales", "Alice Wilber · Sales"

_text = st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40)
                 | st.sampled_from(["\n", "=", ".", " ", "From ", "\n>", "\t"]), max_size=30).map("".join)


@st.composite
def leaf(draw: st.DrawFn, subtype: str) -> bytes:
    body = draw(_text)
    if subtype == "html":
        body = f"<html><body><p>{body}</p></body></html>"
    charset = draw(st.sampled_from(["utf-8", "iso-8859-1", "us-ascii", "windows-1252"]))
    try:
        data = body.replace("\n", "\r\n").encode(charset)
    except UnicodeEncodeError:
        charset, data = "utf-8", body.replace("\n", "\r\n").encode("utf-8")
    cte = draw(st.sampled_from(["quoted-printable", "base64", "8bit", "7bit"]))
    if cte == "7bit" and not data.isascii():
        cte = "quoted-printable"
    if cte == "8bit" and any(len(line) > 900 for line in data.split(b"\n")):
        cte = "base64"
    if cte == "quoted-printable":
        enc = quopri.encodestring(data).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    elif cte == "base64":
        enc = base64.encodebytes(data).replace(b"\n", b"\r\n")
    else:
        enc = data
    return (f"Content-Type: text/{subtype}; charset={charset}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n"
            .encode() + enc)


attachment = st.binary(max_size=400).map(
    lambda b: b'Content-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="a.bin"\r\n'
              b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(b).replace(b"\n", b"\r\n"))


def multipart(kind: str, parts: list[bytes], boundary: str) -> bytes:
    out = f"Content-Type: multipart/{kind}; boundary=\"{boundary}\"\r\n\r\npreamble\r\n".encode()
    for p in parts:
        out += f"--{boundary}\r\n".encode() + p + b"\r\n"
    return out + f"--{boundary}--\r\nepilogue\r\n".encode()


@st.composite
def message(draw: st.DrawFn) -> bytes:
    shape = draw(st.sampled_from(["plain", "html", "alternative", "mixed", "mixed-alternative"]))
    if shape in ("plain", "html"):
        body = draw(leaf(shape))
    elif shape == "alternative":
        body = multipart("alternative", [draw(leaf("plain")), draw(leaf("html"))], "alt-1")
    elif shape == "mixed":
        body = multipart("mixed", [draw(leaf("plain")), *draw(st.lists(attachment, max_size=3))], "mix-1")
    else:
        alt = multipart("alternative", [draw(leaf("plain")), draw(leaf("html"))], "alt-2")
        body = multipart("mixed", [alt, *draw(st.lists(attachment, min_size=1, max_size=2))], "mix-2")
    head = b"From: Alice <alice@contoso.com>\r\nTo: bob@example.net\r\nSubject: x\r\n  folded\r\nMIME-Version: 1.0\r\n"
    return head + body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message())
def test_generated_messages_keep_every_untouched_byte(raw: bytes) -> None:
    result = stamp(raw, SIG, mail_from="alice@contoso.com")
    assert result.decision.action == "stamped", result.decision
    invariants.check(raw, result, PROBE_HTML, PROBE_TEXT)
    assert all(len(line.rstrip(b"\r")) <= 998 for line in result.data.split(b"\n"))
    assert stamp(result.data, SIG).data == result.data  # stamping twice equals stamping once


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_never_crash_and_never_lose_bytes(raw: bytes) -> None:
    result = stamp(raw, SIG, mail_from="alice@contoso.com")
    if result.decision.action != "stamped":
        assert result.data.endswith(raw)
    assert stamp(result.data, SIG).data == result.data
