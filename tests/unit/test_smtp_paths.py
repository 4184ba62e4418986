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
