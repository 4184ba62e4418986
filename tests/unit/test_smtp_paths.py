"""RelaySMTP._getaddr's fast path (issue #14) answers exactly as aiosmtpd's email-package parser
does for every MAIL/RCPT argument, simple or not (anything it does not recognise goes to aiosmtpd)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.server import RelaySMTP

PIECES = st.sampled_from(["<", ">", "@", ".", "a", "Bob", "x-y", "+tag", "example", "com", " ", "\t", "SIZE=10",
                          "body=8bitmime", "(c)", '"q x"', "[1.2.3.4]", ":", ",", "é", "\\", "", "..", "<>"])


@settings(max_examples=3000, deadline=None)
@given(st.lists(PIECES, max_size=12).map("".join), st.sampled_from([0, 3, 64]))
def test_same_answer_as_aiosmtpd(arg: str, limit: int) -> None:
    fake: Any = SimpleNamespace(local_part_limit=limit)
    assert outcome(RelaySMTP._getaddr, fake, arg) == outcome(SMTP._getaddr, fake, arg)


def outcome(fn: Any, *args: Any) -> object:
    """The answer, or the exception's type: the email package's parser raises on some inputs
    (IndexError on a lone "<"), and aiosmtpd's command loop turns that into a 500 either way."""
    try:
        return fn(*args)
    except Exception as e:  # compared, not swallowed
        return type(e)


def test_the_common_forms_take_the_fast_path() -> None:
    fake: Any = SimpleNamespace(local_part_limit=64)
    for arg, want in [("<alice@contoso.com>", ("alice@contoso.com", "")),
                      ("<a.b+c@x.example> SIZE=10240 Body=8bitmime", ("a.b+c@x.example", "SIZE=10240 Body=8bitmime")),
                      ("  <bob@example.net>", ("bob@example.net", ""))]:
        assert RelaySMTP._getaddr(fake, arg) == want == SMTP._getaddr(fake, arg)


def test_forms_near_the_fast_path_match_aiosmtpd() -> None:
    fake: Any = SimpleNamespace(local_part_limit=64)
    for arg in ["<a@b> (comment) SIZE=1", "<a@b>x", "<a@b>\tSIZE=1", "<a@b> ", "<>", "<a@b> SIZE=1 (c)",
                "<a..b@c>", "<a@b.>", "<a@[1.2.3.4]>", "<é@b>", "a@b", "<a@b>  \tsize=5  ", "<" + "x" * 65 + "@b>"]:
        assert outcome(RelaySMTP._getaddr, fake, arg) == outcome(SMTP._getaddr, fake, arg), arg


def test_the_allowed_network_verdicts_follow_the_configuration() -> None:
    """Guard.admit remembers each address's verdict for the ``allowed`` networks it was found
    against: a reload that changes them (Guard.configure) is honoured at the next connection."""
    import ipaddress

    from relay.smtp.server import _VERDICTS_KEPT, Guard

    loopback = (ipaddress.ip_network("127.0.0.0/8"),)
    g = Guard(allowed=loopback)
    for _ in range(2):  # the second time from the memo
        assert g.admit("127.0.0.1") is None
        assert g.admit("10.1.2.3") == "554 5.7.1 Connection refused: not an allowed network"
        assert g.admit("::ffff:127.0.0.9") is None  # IPv4-mapped
        assert g.admit("not an address") == "554 5.7.1 Connection refused"
    g.allowed = (ipaddress.ip_network("10.0.0.0/8"),)  # what configure() does on reload
    assert g.admit("10.1.2.3") is None
    assert g.admit("127.0.0.1") == "554 5.7.1 Connection refused: not an allowed network"
    g.allowed = loopback  # back again: not the verdicts of the networks in between
    assert g.admit("10.1.2.3") == "554 5.7.1 Connection refused: not an allowed network"
    for i in range(_VERDICTS_KEPT + 10):  # the sender picks addresses: the memo stays bounded
        g.admit(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert len(g._verdicts) <= _VERDICTS_KEPT


def test_sessions_take_the_running_loop_without_aiosmtpd_make_loop(monkeypatch: Any) -> None:
    """aiosmtpd's make_loop() switches the process-wide warning filters to "error" while it asks
    for the loop, under every connection; a warning raised by another thread (the big-message
    worker) in that window would have become an exception. Sessions use the running loop."""
    import asyncio

    import aiosmtpd.smtp

    def refuse() -> None:
        raise AssertionError("make_loop called")

    monkeypatch.setattr(aiosmtpd.smtp, "make_loop", refuse)

    async def make() -> bool:
        s = RelaySMTP(object(), hostname="relay.test", idle_timeout=60)
        return s.loop is asyncio.get_running_loop()

    assert asyncio.run(make())
