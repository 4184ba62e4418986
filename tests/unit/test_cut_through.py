"""The pure parts of cut-through (relay/cutthrough.py): the head worked out from the first bytes
of a message is, byte for byte, the start of what store and forward sends for the whole message;
the comparison that gates the final dot; and the stamper property they rest on (nothing it
writes depends on what follows the parts it edits)."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import binding, cutthrough, pipeline, wire
from relay.config import Config
from relay.flow import bind_and_plan
from relay.mime.stamper import Image, Signature, stamp
from tests.support import make_deployment

RECEIVED = (b"Received: from mail.contoso.com ([127.0.0.1])\r\n"
            b"\tby relay with ESMTPS id ABC; Sun, 29 Nov 2026 04:00:00 +0000\r\n")
LINE = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"
PEER = binding.Peer(ip="127.0.0.1", cert_names=(), sni=None)
WHEN = dt.datetime(2026, 11, 29, 4, 0, tzinfo=dt.UTC)


@pytest.fixture
def cfg(tmp_path: Path, pki_dir: Path) -> Config:
    return make_deployment(tmp_path, pki_from=pki_dir, signature=True).load()


def message(first: bytes, attachment_kb: int = 256) -> bytes:
    return (b"From: Alice <alice@contoso.com>\r\nTo: <bob@example.net>\r\nSubject: file\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"m\"\r\n\r\n--m\r\n" + first +
            b"\r\n--m\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=\"a.pdf\"\r\n\r\n" +
            LINE * (attachment_kb * 1024 // len(LINE)) + b"--m--\r\n")


HTML = b"Content-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>See the file.</p></body></html>"
ALTERNATIVE = (b"Content-Type: multipart/alternative; boundary=\"alt\"\r\n\r\n--alt\r\n"
               b"Content-Type: text/plain; charset=utf-8\r\n\r\nSee the file.\r\n--alt\r\n" + HTML + b"\r\n--alt--")
QP = (b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
      b"Gr=C3=BC=C3=9Fe,\r\nsee the file.")


def whole(cfg: Config, raw: bytes) -> bytes:
    inbound = pipeline.accept(raw, pipeline.Settings.of(cfg))
    prepared = bind_and_plan(cfg, inbound, "alice@contoso.com", ["bob@example.net"], PEER, WHEN, lambda _g: RECEIVED)
    [copy] = prepared.copies
    return copy.processed.data


def speculate(cfg: Config, prefix: bytes) -> cutthrough.Head | str:
    return cutthrough.speculate(cfg, prefix, plan=bind_and_plan, mail_from="alice@contoso.com",
                                rcpts=["bob@example.net"], peer=PEER, when=WHEN, received_for=lambda _g: RECEIVED)


@pytest.mark.parametrize("first", [HTML, ALTERNATIVE, QP], ids=["html", "alternative", "quoted-printable"])
@pytest.mark.parametrize("prefix_kb", [8, 64, 200])
def test_the_head_then_the_rest_as_received_is_what_store_and_forward_sends(cfg: Config, first: bytes,
                                                                            prefix_kb: int) -> None:
    raw = message(first)
    head = speculate(cfg, raw[:prefix_kb * 1024])
    assert isinstance(head, cutthrough.Head), head
    assert head.decision == "stamped"
    assert raw[head.cut - 2:head.cut] == b"\r\n" and head.cut <= prefix_kb * 1024  # a line start, in the prefix
    assert head.head + raw[head.cut:] == whole(cfg, raw)
    assert head.ascii == head.head.isascii()


@pytest.mark.parametrize("raw, prefix, why", [
    (b"From: alice@contoso.com\r\nSubject: x\r\n\r\n" + LINE * 100, 2000, "not multipart/mixed (text/plain)"),
    (message(HTML), 200, "the cut falls in a text/html part"),
    (message(ALTERNATIVE), 300, "the cut falls in a multipart/alternative part"),
    (message(HTML, 1), 10_000, "the message ended in the prefix"),
    (message(HTML).replace(b"See the file.", b"See\nthe file."), 4000, "bare CR or LF in the first part"),
    (message(HTML).replace(b"<html>", b"..<html>"), 4000, "a line starting with a dot"),
], ids=["single-part", "in-the-html", "in-the-alternative", "complete", "bare-lf", "stuffed-dot"])
def test_no_head_where_the_rest_could_still_change_it(cfg: Config, raw: bytes, prefix: int, why: str) -> None:
    assert speculate(cfg, raw[:prefix]) == why


def test_a_tail_that_changes_the_copy_fails_the_comparison(cfg: Config) -> None:
    # The head is a guess: a tail that turns the message into another one (no close delimiter:
    # malformed, so relayed untouched) gives another output, which finish() compares and refuses.
    raw = message(HTML)
    head = speculate(cfg, raw[:64 * 1024])
    assert isinstance(head, cutthrough.Head)
    broken = raw[:-len(b"--m--\r\n")]
    out = whole(cfg, broken)
    assert not cutthrough.same_output((out,), head.head, memoryview(broken)[head.cut:])
    assert cutthrough.same_output((whole(cfg, raw),), head.head, memoryview(raw)[head.cut:])


PIECE_KINDS = st.sampled_from(["bytes", "bytearray", "view"])


@given(st.binary(min_size=0, max_size=3000), st.lists(st.integers(0, 3000), max_size=8), st.integers(0, 3000),
       st.lists(PIECE_KINDS, min_size=9, max_size=9), st.integers(0, 3000))
def test_same_output_is_equality_of_the_joined_bytes(data: bytes, cuts: list[int], split: int, kinds: list[str],
                                                    flip: int) -> None:
    split = min(split, len(data))
    head, tail = data[:split], data[split:]
    bounds = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    pieces: list[wire.Piece] = []
    for (a, b), kind in zip(itertools.pairwise(bounds), kinds, strict=False):
        part = data[a:b]
        pieces.append(part if kind == "bytes" else bytearray(part) if kind == "bytearray" else memoryview(part))
    assert cutthrough.same_output(pieces, head, memoryview(tail))
    if data:
        i = flip % len(data)
        changed = bytearray(data)
        changed[i] ^= 1
        assert not cutthrough.same_output((bytes(changed),), head, memoryview(tail))
    assert not cutthrough.same_output((data + b"x",), head, memoryview(tail))


def test_same_output_compares_big_messages_a_slice_at_a_time() -> None:
    big = bytes(range(256)) * (3 * wire.SLICE // 256 + 7)
    view = memoryview(big)
    pieces = (b"head", view[:wire.SLICE + 3], view[wire.SLICE + 3:])
    assert cutthrough.same_output(pieces, b"head", view)
    changed = bytearray(big)
    changed[-1] ^= 1
    assert not cutthrough.same_output(pieces, b"head", memoryview(changed))


def test_stuff_doubles_the_dot_that_starts_a_line() -> None:
    assert wire.stuff(b".a\r\nb\r\n.c\r\n..d\r\n") == b"..a\r\nb\r\n..c\r\n...d\r\n"


def test_the_images_boundary_depends_only_on_the_message_up_to_the_html_leaf() -> None:
    # The multipart/related wrapper's boundary is derived from the message: from the part up to
    # the edited leaf only, so a head stamped before the attachment has arrived has the same one.
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    sig = Signature(html='<p><img src="cid:logo.png"> Alice</p>', text="Alice",
                    images=(Image("logo.png", "image/png", png),))
    a = stamp(message(HTML, 8), sig).data
    b = stamp(message(HTML, 64), sig).data
    boundary = a[a.index(b"=_signature-relay_"):][:40]
    assert boundary in b
    assert stamp(message(HTML, 8), sig).data == a  # still deterministic
