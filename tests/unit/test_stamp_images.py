"""Embedded signature images (RFC 2387 multipart/related), for each shape the HTML leaf can be in."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from relay.mime import headers, scanner
from relay.mime.stamper import Image, Signature, stamp

DATA = Path(__file__).resolve().parents[1] / "data" / "stamp"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
SIG = Signature(html='<p><img src="cid:logo.png" alt="Contoso"> Alice</p>', text="Alice",
                images=(Image("logo.png", "image/png", PNG), Image("unused.gif", "image/gif", b"GIF89a")))


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    assert not msg.defects and all(not p.defects for p in msg.walk())
    return msg


def images_of(msg: email.message.EmailMessage) -> list[email.message.EmailMessage]:
    return [p for p in msg.walk() if p.get_content_maintype() == "image"]


def check_cid(msg: email.message.EmailMessage, related: email.message.EmailMessage) -> str:
    body = related.get_body(("html",))
    assert body is not None
    html = str(body.get_content())
    [img] = [p for p in images_of(related) if p["Content-ID"] and "signature-relay" in p["Content-ID"]]
    cid = str(img["Content-ID"]).strip("<>")
    assert f'src="cid:{cid}"' in html
    assert img.get_content() == PNG and img.get_content_disposition() == "inline"
    assert "unused" not in html and all(p.get_filename() != "unused.gif" for p in msg.walk())
    return cid


def test_existing_related_gets_the_image() -> None:
    raw = (DATA / "related_inline_image.in.eml").read_bytes()
    r = stamp(raw, SIG, mail_from="alice@contoso.com")
    msg = parse(r.data)
    assert msg.get_content_type() == "multipart/related"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/html", "image/png", "image/png"]
    check_cid(msg, msg)
    # the original image part is byte-identical
    before, after = scanner.scan(raw), scanner.scan(r.data[r.data.index(b"\r\n") + 2:])
    assert before.body_bytes(before.parts[2]) == after.body_bytes(after.parts[2])
    assert before.header_bytes(before.parts[2]) == after.header_bytes(after.parts[2])


def test_html_in_alternative_is_wrapped_in_a_new_related() -> None:
    raw = (DATA / "gmail_reply.in.eml").read_bytes()
    r = stamp(raw, SIG, mail_from="alice@contoso.com")
    msg = parse(r.data)
    alt = [p.get_content_type() for p in msg.iter_parts()]
    assert alt == ["text/plain", "multipart/related"]
    related = list(msg.iter_parts())[1]
    assert [p.get_content_type() for p in related.iter_parts()] == ["text/html", "image/png"]
    assert related.get_param("type") == "text/html"
    check_cid(msg, related)  # type: ignore[arg-type]
    # text part untouched apart from its signature; outer header and boundaries as received
    assert r.data.count(b"--000000000000a1b2c3") == raw.count(b"--000000000000a1b2c3")


def test_single_part_html_message_becomes_related_keeping_other_header_fields() -> None:
    raw = (DATA / "apple_forward.in.eml").read_bytes()
    r = stamp(raw, SIG, mail_from="alice@contoso.com")
    msg = parse(r.data)
    assert msg.get_content_type() == "multipart/related"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/html", "image/png"]
    check_cid(msg, msg)
    keep = [(f.name, f.value) for f in headers.fields(raw) if not f.name.lower().startswith("content-")]
    got = [(f.name, f.value) for f in headers.fields(r.data)][1:]  # after our marker
    assert [g for g in got if not g[0].lower().startswith("content-")] == keep
    html_part = next(msg.iter_parts())
    assert html_part["Content-Transfer-Encoding"] == "8bit" and html_part.get_content_charset() == "utf-8"


@pytest.mark.parametrize("name", ["related_inline_image", "gmail_reply", "apple_forward"])
def test_image_stamping_is_deterministic_and_idempotent(name: str) -> None:
    raw = (DATA / f"{name}.in.eml").read_bytes()
    a = stamp(raw, SIG, mail_from="alice@contoso.com").data
    assert stamp(raw, SIG, mail_from="alice@contoso.com").data == a
    assert stamp(a, SIG).data == a


def test_cid_never_collides_with_the_message() -> None:
    first = stamp((DATA / "gmail_reply.in.eml").read_bytes(), SIG, mail_from="a@contoso.com").data
    cid = first.split(b"Content-ID: <")[1].split(b">")[0]
    raw = (DATA / "related_inline_image.in.eml").read_bytes().replace(b"<logo@x>", b"<" + cid + b">")
    raw = raw.replace(b"cid:logo@x", b"cid:" + cid)
    out = stamp(raw, SIG, mail_from="a@contoso.com").data
    ids = [f.value for p in scanner.scan(out).parts for f in headers.fields(scanner.scan(out).header_bytes(p))
           if f.name.lower() == "content-id"]
    assert len(ids) == len(set(ids)) == 2


@pytest.mark.parametrize("name", ["gmail_reply", "apple_forward", "related_inline_image"])
def test_images_with_a_signature_that_changes_the_transfer_encoding(name: str) -> None:
    """Regression: wrapping the leaf after its header grew (7bit → quoted-printable) split it wrongly."""
    sig = Signature(html='<p><img src="cid:logo.png"> Ålice — ☎</p>', text="Ålice — ☎",
                    images=(Image("logo.png", "image/png", PNG),))
    r = stamp((DATA / f"{name}.in.eml").read_bytes(), sig, mail_from="alice@contoso.com")
    msg = parse(r.data)
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "Ålice — ☎" in html and html.count("signature-relay") == 2  # the div class and the CID
    assert [p.get_content() for p in images_of(msg) if "signature-relay" in (p["Content-ID"] or "")] == [PNG]


def test_a_big_message_gets_its_images_and_the_same_octets_from_the_readers_buffer() -> None:
    """Over 1 MiB the new multipart/related boundary is derived from the message's ends (hashed
    without building a copy); over CHUNK the relay hands the stamper a bytearray and takes pieces
    back (issue #14). Same output either way, a valid MIME tree, the image embedded once."""
    blob = b"QUJD" * 19 + b"\r\n"
    raw = (b"From: alice@contoso.com\r\nTo: bob@example.net\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"m\"\r\n\r\n--m\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b"<p>Hello Bob,</p>\r\n--m\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + blob * 20_000 + b"--m--\r\n")
    assert len(raw) > 1 << 20
    want = stamp(raw, SIG, mail_from="alice@contoso.com", crlf=True)
    got = stamp(bytearray(raw), SIG, mail_from="alice@contoso.com", crlf=True, dotless=True)
    assert want.decision.action == got.decision.action == "stamped"
    assert got.dotless and len(got.pieces) > 1 and got.data == want.data
    assert [p.get_content_type() for p in images_of(parse(got.data))] == ["image/png"]
    assert stamp(raw, SIG, mail_from="alice@contoso.com", crlf=True).data == want.data  # deterministic
