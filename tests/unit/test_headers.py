from __future__ import annotations

import datetime as dt
import email.utils

from hypothesis import given
from hypothesis import strategies as st

from relay.mime import headers, trace

MSG = (b"Received: from a\r\n\tby b; Sat, 1 Jan 2022 00:00:00 +0000\r\n"
       b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
       b" folded continuation\r\n"
       b"x-codetwoprocessed: TRUE\r\n"
       b"\r\n"
       b"Subject: not a header, body text\r\n")


def test_header_end_finds_first_empty_line() -> None:
    assert MSG[headers.header_end(MSG):] == b"Subject: not a header, body text\r\n"


def test_header_end_bare_lf_and_no_body() -> None:
    assert headers.header_end(b"A: 1\nB: 2\n\nbody") == len(b"A: 1\nB: 2\n\n")
    assert headers.header_end(b"A: 1\r\n") == len(b"A: 1\r\n")
    assert headers.header_end(b"\r\nbody") == 2


def test_fields_unfold_and_offsets() -> None:
    fs = list(headers.fields(MSG))
    assert [f.name for f in fs] == ["Received", "Subject", "x-codetwoprocessed"]
    assert fs[1].value == "=?utf-8?q?caf=C3=A9?= folded continuation"
    # offsets cover the raw bytes of each field exactly, folding included
    assert MSG[fs[1].start:fs[1].end] == b"Subject: =?utf-8?q?caf=C3=A9?=\r\n folded continuation\r\n"


def test_get_all_is_case_insensitive_and_top_level_only() -> None:
    assert headers.get_all(MSG, "X-CodeTwoProcessed") == ["TRUE"]
    assert headers.get_all(MSG, "subject") == ["=?utf-8?q?caf=C3=A9?= folded continuation"]


def test_prepend_keeps_every_original_byte() -> None:
    out = headers.prepend(MSG, b"X-A: 1\r\n", b"X-B: 2\r\n")
    assert out == b"X-A: 1\r\nX-B: 2\r\n" + MSG


def test_prepend_follows_bare_lf_messages() -> None:
    raw = b"Subject: x\n\nbody\n"
    assert headers.prepend(raw, b"X-A: 1\r\n") == b"X-A: 1\nSubject: x\n\nbody\n"


@given(st.binary(max_size=2000))
def test_prepend_is_pure_prefix(raw: bytes) -> None:
    new = b"X-A: 1\r\n"
    out = headers.prepend(raw, new)
    assert out.endswith(raw)
    assert len(out) - len(raw) in (len(new), len(new) - 1)


@given(st.binary(max_size=3000))
def test_scanner_never_raises(raw: bytes) -> None:
    list(headers.fields(raw))
    headers.get_all(raw, "X-MS-Exchange-CrossTenant-Id")


def test_received_sanitises_client_supplied_values() -> None:
    """A CR/LF in the HELO name or address must not inject a header field of its own."""
    import datetime as dt

    r = trace.received(helo="evil\r\nBcc: victim@x", peer_ip="192.0.2.1", by="relay.test", queue_id="Q1",
                       recipients=["a@b\r\nX-Injected: 1"], tls="version=TLSv1.3 cipher=X",
                       smtputf8=False, when=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    fields = list(headers.fields(r + b"\r\n"))
    assert [f.name for f in fields] == ["Received"]
    assert b"ESMTPS" in r and b"for <a@b??X-Injected:?1>" in r
    assert all(len(line) <= 78 for line in r.split(b"\r\n"))


def test_received_omits_for_with_several_recipients() -> None:
    import datetime as dt

    r = trace.received(helo="h", peer_ip="::1", by="b", queue_id="Q", recipients=["a@x", "b@x"], tls=None,
                       smtputf8=True, when=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert b" for " not in r and b"with UTF8SMTP id" in r


ZONES = st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=1)), dt.timezone(dt.timedelta(hours=-5, minutes=-30)),
                         None])


@given(st.lists(st.tuples(st.datetimes(min_value=dt.datetime(1971, 1, 2), max_value=dt.datetime(2100, 1, 1)), ZONES),
                max_size=12))
def test_the_received_date_is_format_datetime_of_each_instant(whens: list[tuple[dt.datetime, dt.tzinfo | None]]
                                                              ) -> None:
    """trace keeps the date string for the second it names: never another zone's string for the
    same instant (equal instants compare equal), never another second's."""
    for naive, zone in whens:
        when = naive.replace(tzinfo=zone)
        same_instant = when.astimezone(dt.timezone(dt.timedelta(hours=3))) if zone is not None else when
        for w in (when, same_instant, when.replace(microsecond=(when.microsecond + 1) % 1_000_000)):
            assert trace._date(w) == email.utils.format_datetime(w)


ADDRESS_VALUES = st.lists(st.sampled_from(["Alice <alice@contoso.com>", "bob@example.net", '"A, B" <ab@x.test>',
                                           "undisclosed-recipients:;", "=?utf-8?q?Caf=C3=A9?= <c@x.test>", "x" * 600,
                                           "<a@b>, c@d", "Name only", ""]), max_size=3)


@given(ADDRESS_VALUES)
def test_kept_address_parses_are_the_parse(values: list[str]) -> None:
    """headers.addresses keeps the parse of short From: values across messages: each call, on a new
    message's index, gives what email.utils.getaddresses gives for that message."""
    raw = b"".join(b"From: " + v.encode() + b"\r\n" for v in values) + b"\r\nbody\r\n"
    want = tuple(a for _, a in email.utils.getaddresses([headers.text(v) for v in headers.index(raw).get("from", [])]))
    for _ in range(2):
        assert headers.addresses(headers.index(raw), "from") == want
