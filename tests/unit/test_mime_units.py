from __future__ import annotations

import binascii

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.mime import codec, placement, scanner
from relay.mime.stamper import Signature, stamp

# --- scanner ------------------------------------------------------------------------------------


def test_boundary_that_prefixes_another_is_not_confused() -> None:
    raw = (b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: multipart/alternative; '
           b'boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b1--\r\n--b--\r\n')
    s = scanner.scan(raw)
    assert not s.defects
    assert [p.ctype for p in s.walk()] == ["multipart/mixed", "multipart/alternative", "text/plain"]
    assert s.body_bytes(s.parts[2]) == b"hi"


def test_delimiter_must_start_a_line_and_may_have_trailing_space() -> None:
    raw = (b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x  \r\nContent-Type: text/plain\r\n\r\n'
           b"not a --x delimiter\r\n--x--\r\n")
    s = scanner.scan(raw)
    assert not s.defects and s.body_bytes(s.parts[1]) == b"not a --x delimiter"


def test_defects_are_recorded_never_raised() -> None:
    assert "missing-close-delimiter@0" in scanner.scan(
        b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n\r\nbody\r\n').defects
    assert scanner.scan(b"Content-Type: multipart/mixed\r\n\r\nx").defects == ["multipart-without-boundary@0"]
    assert scanner.scan(b'Content-Type: multipart/mixed; boundary="x"\r\n\r\nno parts').defects == [
        "missing-close-delimiter@0", "multipart-without-parts@0"]


def _nested(depth: int) -> bytes:
    raw = b"Content-Type: text/plain\r\n\r\nleaf\r\n"
    for i in range(depth):
        raw = (f'Content-Type: multipart/mixed; boundary="d{i}"\r\n\r\n--d{i}\r\n'.encode() + raw
               + f"\r\n--d{i}--\r\n".encode())
    return raw


def test_nesting_and_part_limits_become_pass_through() -> None:
    assert "nesting-too-deep" in scanner.scan(_nested(120)).defects
    assert not scanner.scan(_nested(50)).defects
    many = b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n' + b"--m\r\n\r\nx\r\n" * 1200 + b"--m--\r\n"
    assert "too-many-parts" in scanner.scan(many).defects
    r = stamp(many, Signature("<p>s</p>", "s"), mail_from="a@b")
    assert r.decision.reason == "malformed:too-many-parts"


def test_rfc2231_and_quoted_params() -> None:
    main, params = scanner.parse_params("""text/plain; name*0*=utf-8''caf%C3%A9; name*1=".txt"; a="x;y" """)
    assert main == "text/plain" and params["name"] == "café.txt" and params["a"] == "x;y"


# --- codec --------------------------------------------------------------------------------------


@given(st.text(max_size=400), st.sampled_from(["utf-8", "iso-8859-2", "shift_jis", "windows-1252"]))
def test_qp_roundtrips_and_never_splits_a_character(text: str, charset: str) -> None:
    try:
        if text.encode(charset).decode(charset) != text:
            return  # not representable faithfully (e.g. Shift_JIS maps "¥" to 0x5C)
    except UnicodeError:
        return
    enc = codec.encode_qp(text, charset)
    assert all(len(line) <= 76 for line in enc.split(b"\r\n"))
    # every line break kept as written (issue #9), and only CRLF on the wire
    assert binascii.a2b_qp(enc).decode(charset) == text
    assert b"\n" not in enc.replace(b"\r\n", b"") and b"\r" not in enc.replace(b"\r\n", b"")
    if charset == "utf-8":
        # every soft-broken line ends on a character boundary: its bytes decode on their own
        for line in enc.split(b"\r\n"):
            if line.endswith(b"="):
                binascii.a2b_qp(line[:-1]).decode("utf-8")


def test_non_ascii_compatible_leaf_becomes_utf8() -> None:
    body = "Hello Bob\r\n".encode("utf-16")
    import base64

    raw = (b"Content-Type: text/plain; charset=utf-16\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(body).replace(b"\n", b"\r\n"))
    r = stamp(raw, Signature("<p>s</p>", "Sig"), mail_from="a@b")
    assert r.decision.action == "stamped" and b"charset=utf-8" in r.data
    with pytest.raises(ValueError):
        codec.encode_qp("x", "utf-16")


def test_qp_protects_from_and_dot_and_trailing_space() -> None:
    assert codec.encode_qp("From me\r\n.\r\nend  ", "utf-8") == b"=46rom me\r\n=2E\r\nend =20"
    # after an escaped bare LF the next encoded line starts fresh: still protected
    assert codec.encode_qp("a\nFrom me", "utf-8") == b"a=0A=\r\n=46rom me"


def test_base64_lines_are_76() -> None:
    enc = codec.encode_base64(bytes(range(256)) * 3)
    assert {len(line) for line in enc.split(b"\r\n")[:-2]} == {76}


@pytest.mark.parametrize("body", [b"SGVsbG8*!!", b"SGVsb"])
def test_bad_base64_is_a_decode_error(body: bytes) -> None:
    with pytest.raises(codec.DecodeError):
        codec.decode_transfer(body, "base64")


# --- placement: localized reply markers -------------------------------------------------------


@pytest.mark.parametrize(("text", "rule"), [
    ("Danke\n\nAm 03.01.2025 um 16:01 schrieb Bob Kelly <bob@x>:\n> alt\n", "text:attribution"),
    ("Merci\n\nLe ven. 3 janv. 2025 à 16:01, Bob Kelly <bob@x> a écrit :\n> vieux\n", "text:attribution"),
    ("Gracias\n\nEl vie, 3 ene 2025 a las 16:01, Bob Kelly (<bob@x>) escribió:\n> viejo\n", "text:attribution"),
    ("Grazie\n\nIl giorno ven 3 gen 2025 alle ore 16:01 Bob ha scritto:\n> vecchio\n", "text:attribution"),
    ("Bedankt\n\nOp vr 3 jan 2025 om 16:01 schreef Bob Kelly <bob@x>:\n> oud\n", "text:attribution"),
    ("Dzięki\n\nW dniu 3.01.2025 o 16:01, Bob Kelly pisze:\n> stary\n", "text:attribution"),
    ("Obrigado\n\nEm sex., 3 de jan. de 2025 às 16:01, Bob Kelly <bob@x> escreveu:\n> antigo\n", "text:attribution"),
    ("Merci\n\n-----Message d'origine-----\nDe : Bob\n", "text:original-message"),
    ("Gracias\n\nDe: Bob Kelly\nEnviado: viernes\nPara: Alice\n", "text:header-block"),
    ("Grazie\n\nDa: Bob Kelly\nInviato: venerdì\n", "text:header-block"),
    ("Bedankt\n\nVan: Bob Kelly\nVerzonden: vrijdag\n", "text:header-block"),
    ("Dzięki\n\nOd: Bob Kelly\nWysłano: piątek\n", "text:header-block"),
    ("Obrigado\n\n________________________________\nDe: Bob Kelly\nEnviada: sexta\n", "text:outlook-separator"),
    ("Hi\n\nBegin forwarded message:\n\nFrom: x\n", "text:forwarded"),
    ("New message, no history.\n", "text:end"),
])
def test_text_reply_markers(text: str, rule: str) -> None:
    where = placement.find_text(text)
    assert where.rule == rule
    assert text[:where.offset].split("\n")[0] == text.split("\n")[0]  # newest reply stays above


@pytest.mark.parametrize(("html", "rule", "before"), [
    ('<p>Danke</p><div><b>Von:</b> Bob<br><b>Gesendet:</b> Freitag</div>', "html:header-block", "<div><b>Von"),
    ('<p>Merci</p><p><b>De :</b> Bob<br><b>Envoyé :</b> vendredi</p>', "html:header-block", "<p><b>De"),
    ("<body><p>x</p><!--[if mso]></body><![endif]--></body>", "html:body-end", "</body>"),
    ("<p>no body tag</p>", "html:end", ""),
    ("<html><p>x</p></html>", "html:html-end", "</html>"),
])
def test_html_markers(html: str, rule: str, before: str) -> None:
    where = placement.find_html(html)
    assert where.rule == rule
    assert html[where.offset:].startswith(before)


def test_bottom_placement_ignores_reply_markers() -> None:
    assert placement.find_text("hi\n> quoted\n", bottom=True).rule == "text:end"
    assert placement.find_html('<body><div class="gmail_quote">q</div></body>', bottom=True).rule == "html:body-end"


@given(st.lists(st.text(st.characters(codec="ascii", exclude_characters="\r\n"), max_size=120), min_size=1,
                max_size=12))
def test_qp_line_span_matches_decoded_lines(lines: list[str]) -> None:
    from relay.mime import stamper

    body = codec.encode_qp("\r\n".join(lines), "utf-8")
    hard = body.count(b"\n") - body.count(b"=\n") - body.count(b"=\r\n")
    assert hard == len(lines) - 1
    for k, line in enumerate(lines):
        a, b = stamper._qp_line_span(body, k, hard)
        assert binascii.a2b_qp(body[a:b]).decode() == line


def test_bare_line_endings_are_reported_not_fatal() -> None:
    s = scanner.scan(b"Subject: x\rTo: y\n\nline\r\n")
    assert not s.defects and s.anomalies == ["bare-lf", "bare-cr"]
    r = stamp(b"Subject: x\nContent-Type: text/plain\n\n" + b"z" * 1200 + b"\n", Signature("<p>s</p>", "s"),
              mail_from="a@b")
    assert r.decision.action == "stamped" and r.anomalies == ("bare-lf", "long-line")
    assert all(len(line) <= 998 for line in r.data.split(b"\n"))
