"""Pure tests for the one normalisation and the domain comparison binding relies on (issue #10)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import addresses, ingress
from relay.errors import PermanentError

AIOSMTPLIB_LINE_ENDINGS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")  # aiosmtplib.protocol, as delivery applies it


@given(st.binary(max_size=300))
def test_normalisation_is_exactly_what_delivery_does(data: bytes) -> None:
    out, changed = ingress.normalise_line_endings(data)
    assert out == AIOSMTPLIB_LINE_ENDINGS.sub(b"\r\n", data)
    assert changed == (out != data)
    assert AIOSMTPLIB_LINE_ENDINGS.sub(b"\r\n", out) == out  # delivery then changes nothing


@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n"]), max_size=30).map(b"".join))
def test_dotless_survives_ingress_only_when_no_line_starts_with_a_dot(body: bytes) -> None:
    """The DATA reader vouches by CRLF lines; normalising a bare CR or LF can put a dot at a line
    start ("a\n.b" becomes "a\r\n.b"), so the word is dropped then (delivery would not stuff it)."""
    raw = b"From: a@b\r\n\r\n" + body + b"\r\n"
    reader_says = b"\r\n." not in raw and not raw.startswith(b".")
    msg = ingress.accept(raw, ingress.IngressLimits(), dotless=reader_says)
    if msg.dotless:
        assert b"\r\n." not in msg.raw
    assert msg.dotless == (reader_says and not msg.normalised)


def test_the_header_we_index_is_the_header_the_tenant_parses() -> None:
    raw = (b"X-MS-Exchange-CrossTenant-Id: t\r\nX-A: a\rFrom: CEO <ceo@bank.example>\r\n\r\r\n"
           b"From: alice@contoso.com\r\n\r\nbody\r\n")
    msg = ingress.accept(raw, ingress.IngressLimits())
    assert msg.top["from"] == ["CEO <ceo@bank.example>"] and msg.normalised
    import email
    import email.policy

    assert email.message_from_bytes(msg.raw, policy=email.policy.compat32).get_all("From") == [
        "CEO <ceo@bank.example>"]


@pytest.mark.parametrize(("raw", "code"), [
    (b"A: b\x00c\r\n\r\nbody", "554 5.6.0"),
    (b"A: b\r\n" * 3000 + b"\r\nbody", "552 5.3.4"),
    (b"A: " + b"x" * 300_000 + b"\r\n\r\nbody", "552 5.3.4"),
])
def test_header_limits(raw: bytes, code: str) -> None:
    with pytest.raises(PermanentError) as e:
        ingress.accept(raw, ingress.IngressLimits())
    assert str(e.value.reply).startswith(code)


def test_nul_in_the_body_is_not_a_header_problem() -> None:
    assert ingress.accept(b"A: b\r\n\r\nbody\x00x\r\n", ingress.IngressLimits()).top == {"a": ["b"]}


@pytest.mark.parametrize(("domain", "expected"), [
    ("Contoso.COM.", "contoso.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
])
def test_domains_compare_as_a_labels(domain: str, expected: str) -> None:
    assert addresses.normalise_domain(domain) == expected


@pytest.mark.parametrize("domain", [
    "fabri\u212aam.com",  # KELVIN SIGN, lower() == "k"
    "\uff46abrikam.com",  # FULLWIDTH LATIN SMALL LETTER F
    "conto\u017fo.com",  # LATIN SMALL LETTER LONG S, maps to "s"
    "a\u200bb.com",  # ZERO WIDTH SPACE
    "exa mple.com\u0301",
])
def test_lookalike_domains_are_refused(domain: str) -> None:
    with pytest.raises(addresses.BadDomain):
        addresses.normalise_domain(domain)


def test_privacy_scrubs_addresses_in_messages_and_tracebacks() -> None:
    """Issue #15: --log-privacy covers every line, tracebacks included (text format)."""
    import logging

    from relay.log import Privacy, SafeFormatter

    f = SafeFormatter("%(message)s")
    f.privacy = Privacy(b"0123456789abcdef")
    addr = "Bob@" + "Example.net"  # not in the source line the traceback quotes
    try:
        raise ValueError(f"cannot reach <{addr}>")
    except ValueError:
        import sys

        rec = logging.LogRecord("relay", logging.ERROR, __file__, 1, "from=<%s>", ("bob@example.net",), sys.exc_info())
    out = f.format(rec)
    token = f.privacy.token("bob@example.net")
    assert "example.net" not in out.lower() and out.count(token) == 2  # same token, any case
