from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay import pipeline
from relay.mime import headers
from tests.support import message

RECEIVED = b"Received: from x ([127.0.0.1])\r\n\tby relay; Sat, 1 Jan 2022 00:00:00 +0000\r\n"


def run(raw: bytes) -> pipeline.Processed:
    return pipeline.process(raw, processed_header="X-CodeTwoProcessed", received=RECEIVED)


def test_marks_once_and_keeps_message_bytes() -> None:
    raw = message()
    out = run(raw)
    assert out.decision.action == "marked"
    assert out.data == RECEIVED + b"X-CodeTwoProcessed: true\r\n" + raw
    assert headers.get_all(out.data, "X-CodeTwoProcessed") == ["true"]


def test_already_processed_is_not_marked_again() -> None:
    raw = message(extra_headers="x-codetwoprocessed: True\r\n")
    out = run(raw)
    assert out.decision == pipeline.Decision("pass-through", "already-processed")
    assert out.data == RECEIVED + raw


def test_processed_header_inside_attached_message_does_not_count() -> None:
    body = ("--b\r\nContent-Type: message/rfc822\r\n\r\nX-CodeTwoProcessed: true\r\nSubject: old\r\n\r\nhi\r\n"
            "--b--\r\n")
    raw = message(body=body).replace(b"text/plain; charset=utf-8", b'multipart/mixed; boundary="b"')
    assert run(raw).decision.action == "marked"


def test_configured_header_name_is_used() -> None:
    out = pipeline.process(message(), processed_header="X-Sig-Done", received=RECEIVED)
    assert headers.get_all(out.data, "X-Sig-Done") == ["true"]


@given(st.binary(max_size=4000))
def test_idempotent_and_lossless_on_any_bytes(raw: bytes) -> None:
    once = run(raw)
    assert once.data.endswith(raw)  # every received byte is still there, in order
    twice = run(once.data)
    # the second pass finds the marker and adds no second one
    assert headers.get_all(twice.data, "X-CodeTwoProcessed") == headers.get_all(once.data, "X-CodeTwoProcessed")
    assert twice.decision.action == "pass-through"
