"""relay.wire (issue #14): the zero-split line check, one-copy unstuffing and piecewise stuffing
give exactly what the obvious whole-message expressions give (RFC 5321 §4.5.2, §4.5.3.1.6)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from relay import wire

# Few symbols, so CR, LF, CRLF, dots at line starts and long runs all turn up often.
octets = st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"aaaa"]), max_size=60).map(b"".join)
lines = st.lists(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"aaa"]), max_size=12).map(b"".join),
                 max_size=12).map(lambda ls: b"".join(x + b"\r\n" for x in ls))


SPLIT_BELOW = wire.SPLIT_BELOW


def stuff_reference(data: bytes) -> bytes:
    return (b"." if data.startswith(b".") else b"") + data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


@settings(max_examples=600, deadline=None)
@given(octets, st.integers(min_value=0, max_value=24), st.booleans())
def test_line_longer_than_is_the_split_answer(data: bytes, n: int, windows: bool) -> None:
    if windows:
        wire.SPLIT_BELOW = 0  # the windowed search, as for a big message
    try:
        line_checks(data, n)
    finally:
        wire.SPLIT_BELOW = SPLIT_BELOW



def line_checks(data: bytes, n: int) -> None:
    assert wire.line_longer_than(data, n) == (max(map(len, data.split(b"\r\n"))) > n)
    assert wire.line_longer_than(data, n, sep=b"\n") == (max(map(len, data.split(b"\n"))) > n)  # codec.line_over
    cut = len(data) // 2
    assert wire.line_longer_than(data, n, cut) == (max(map(len, data[:cut].split(b"\r\n"))) > n)


def test_line_longer_than_finds_a_long_line_anywhere() -> None:
    body = b"x" * 78 + b"\r\n"
    for where in (0, 1000, 20_000):
        data = body * where + b"y" * 999 + b"\r\n" + body * 10
        assert wire.line_longer_than(data, 998) and not wire.line_longer_than(data, 999)
    assert not wire.line_longer_than(body * 5000, 78) and wire.line_longer_than(body * 5000, 77)


@settings(max_examples=400, deadline=None)
@given(lines)
def test_unstuff_is_replace_then_slice(content: bytes) -> None:
    raw = b"\r\n" + content + b".\r\n"
    assert wire.unstuff(raw) == raw.replace(b"\r\n.", b"\r\n")[2:-2]


@settings(max_examples=400, deadline=None)
@given(lines)
def test_stuff_is_the_two_replaces(content: bytes) -> None:
    """wire.stuff searches first and copies only when a dot is to be added: same bytes."""
    assert wire.stuff(content) == (b"." if content.startswith(b".") else b"") + content.replace(b"\r\n.", b"\r\n..")


@settings(max_examples=600, deadline=None)
@given(lines, st.integers(min_value=1, max_value=20))
def test_stuffed_pieces_join_to_the_reference(data: bytes, size: int) -> None:
    pieces = list(wire.stuffed_pieces(data, size))
    joined = b"".join(bytes(p) for p in pieces)
    assert joined == stuff_reference(data)
    assert wire.unstuff(b"\r\n" + joined) == data  # what a receiver makes of it


def test_big_pieces_are_views_of_the_message_unless_a_dot_is_added() -> None:
    data = (b"QUJD" * 19 + b"\r\n") * 20_000 + b".hidden\r\n" + (b"x" * 78 + b"\r\n") * 10
    pieces = list(wire.stuffed_pieces(data))
    assert b"".join(bytes(p) for p in pieces) == stuff_reference(data)
    assert sum(isinstance(p, memoryview) for p in pieces) >= len(pieces) - 2  # the dotted piece, the terminator
    assert all(len(p) <= wire.CHUNK for p in pieces)
    small = b"hello\r\n.dot\r\n"
    assert list(wire.stuffed_pieces(small)) == [stuff_reference(small)]  # one write for a small message


crlf_lines = st.lists(st.sampled_from([b"a", b".", b"aa"]), max_size=8).map(
    lambda xs: b"".join(x + b"\r\n" for x in xs))
pieces = st.lists(st.sampled_from([b"x", b"\r\n", b"\r", b"\n", b"yy"]), max_size=5).map(b"".join)


def as_edits(raw: bytes, cuts: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """(start, length, new) drawn by hypothesis as the stamper's edits: in order, not overlapping,
    inside ``raw``."""
    edits, pos = [], 0
    for start, length, new in sorted(cuts):
        start = max(start, pos)
        if start > len(raw):
            break
        end = min(start + length, len(raw))
        edits.append((start, end, new))
        pos = end
    return edits


@settings(max_examples=800, deadline=None)
@given(crlf_lines, pieces, st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6), pieces), max_size=3))
def test_the_stampers_crlf_proof_is_sound(raw: bytes, fields: bytes, cuts: list[tuple[int, int, bytes]]) -> None:
    """StampResult.crlf lets delivery skip its scan; it must never say CRLF-only when it is not."""
    from relay.mime.stamper import _join, _splices_keep_crlf

    edits = as_edits(raw, cuts)
    if _splices_keep_crlf(raw, fields, edits):
        assert wire.crlf_only(_join(raw, fields, edits))


dot_pieces = st.lists(st.sampled_from([b"x", b"\r\n", b".", b"\r", b"\n", b"\r\n.", b"yy"]), max_size=5).map(b"".join)
dotless_lines = st.lists(st.sampled_from([b"a", b"a.", b"aa", b""]), max_size=8).map(
    lambda xs: b"".join(x + b"\r\n" for x in xs))


@settings(max_examples=1500, deadline=None)
@given(dotless_lines, dot_pieces, st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6), dot_pieces), max_size=3))
def test_the_stampers_dotless_proof_is_sound(raw: bytes, fields: bytes, cuts: list[tuple[int, int, bytes]]) -> None:
    """StampResult.dotless lets delivery skip its dot-stuffing search; it must never say "no line
    starts with a dot" when one does, and the pieces it then sends are the reference stuffing."""
    from relay.mime.stamper import _chunks, _join, _splices_keep_dotless

    edits = as_edits(raw, cuts)
    out = _join(raw, fields, edits)
    if _splices_keep_dotless(_chunks(raw, fields, edits)):
        assert not out.startswith(b".") and b"\r\n." not in out
        if out.endswith(b"\r\n"):
            assert b"".join(bytes(p) for p in wire.stuffed_pieces(out, 3, dotless=True)) == stuff_reference(out)
    elif not edits and not fields:
        raise AssertionError("nothing spliced into a dotless message: the proof must hold")


def test_dotless_pieces_are_views_and_the_proof_holds_for_a_stamped_message() -> None:
    from relay.mime.stamper import Signature, stamp

    body = (b"QUJD" * 19 + b"\r\n") * 20_000
    raw = (b"From: a@contoso.com\r\nTo: b@example.net\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"m\"\r\n\r\n--m\r\nContent-Type: text/plain\r\n\r\n"
           b"Hello\r\n--m\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + body + b"--m--\r\n")
    r = stamp(raw, Signature("<p>s</p>", "Regards\n.dot line"), mail_from="a@contoso.com", crlf=True, dotless=True)
    assert r.decision.action == "stamped" and not r.dotless  # the signature's ".dot line" starts with a dot
    r = stamp(raw, Signature("<p>s</p>", "Regards"), mail_from="a@contoso.com", crlf=True, dotless=True)
    assert r.decision.action == "stamped" and r.dotless and r.crlf
    pieces = list(wire.stuffed_pieces(r.data, dotless=True))
    assert all(isinstance(p, memoryview) for p in pieces[:-1]) and pieces[-1] == b".\r\n"
    assert b"".join(bytes(p) for p in pieces) == stuff_reference(r.data)
    assert not stamp(raw, Signature("<p>s</p>", "Regards"), mail_from="a@contoso.com", crlf=True).dotless


@settings(max_examples=600, deadline=None)
@given(octets, st.sampled_from([b"\r\n", b"\r\n.", b"--m", b"a", b""]), st.integers(0, 70), st.integers(0, 70),
       st.integers(1, 5))
def test_sliced_find_and_crlf_only_match_the_whole_calls(data: bytes, needle: bytes, start: int, end: int,
                                                          slice_: int) -> None:
    old = wire.SLICE, wire.PAIRS, wire.MAPPED_FROM
    wire.SLICE = wire.PAIRS = slice_  # tiny slices, so every cut position is exercised
    wire.MAPPED_FROM = 0  # and the mapped way on every range, however short
    try:
        assert wire.find(data, needle, start, end) == data.find(needle, start, end)
        crlf = data.count(b"\r\n")
        assert wire.crlf_only(data) == (data.count(b"\n") == crlf and data.count(b"\r") == crlf)
        stop = min(end, len(data))
        for paired in (wire._paired_mapped, wire._paired_counted):  # both ways, on a range too
            if stop > start:
                assert paired(data, start, stop) == (BARE.search(data[start:stop]) is None)
    finally:
        wire.SLICE, wire.PAIRS, wire.MAPPED_FROM = old


BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")  # a CR or LF that is not half of a CRLF (the oracle)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"\r\r", b"\n\n", b"\r\n\r"]), max_size=30).map(b"".join),
       st.lists(st.integers(0, 60), max_size=8), st.lists(st.integers(0, 60), max_size=8), st.integers(1, 4))
def test_the_incremental_crlf_check_is_crlf_only_of_what_it_checked(data: bytes, arrivals: list[int],
                                                                    asks: list[int], slice_: int) -> None:
    """wire.CrlfCheck (the DATA reader's, issue #14): a buffer growing in pieces, checked up to
    points within what has arrived, proves exactly what crlf_only says of the whole prefix. A CR
    that ends one arrival and the LF that starts the next are one CRLF (a check never ends just
    after a CR, so a LF where a check ended is bare)."""
    old = wire.SLICE, wire.PAIRS, wire.MAPPED_FROM
    wire.SLICE = wire.PAIRS = slice_
    wire.MAPPED_FROM = 0
    try:
        check, buf = wire.CrlfCheck(), bytearray()
        steps = sorted({*arrivals, len(data)})
        for i, have in enumerate(steps):
            buf += data[len(buf):have]
            for ask in sorted(a for a in asks if a <= len(buf)) + [len(buf)] * (i == len(steps) - 1):
                check.upto(buf, ask)
                done = min(check.checked, len(buf))
                assert check.bare or BARE.search(bytes(buf[:done])) is None  # sound
        assert check.proves(len(data)) == (BARE.search(data) is None)  # and exact at the end
        assert check.proves(len(data)) == wire.crlf_only(data)
        for a in range(len(data) + 1):  # ranges: no pairing across their edges
            for b in (a, (a + len(data)) // 2, len(data)):
                if b >= a:
                    assert wire.crlf_only(data, a, b) == (BARE.search(data[a:b]) is None)
    finally:
        wire.SLICE, wire.PAIRS, wire.MAPPED_FROM = old


def test_the_incremental_crlf_check_stops() -> None:
    check = wire.CrlfCheck()
    check.upto(b"a\r\nb\r", 5)
    assert check.checked == 4 and not check.bare  # the CR waits for its LF
    assert check.proves(4) and not check.proves(5)
    check.stop()
    assert not check.proves(0)


def test_big_buffers_are_released_on_glibc() -> None:
    """serve calls this so a 25 MB message's buffers go back to the system (mallopt M_MMAP_THRESHOLD)."""
    import platform

    from relay import offload

    if platform.libc_ver()[0] == "glibc":
        assert offload.release_big_buffers()
    else:
        assert not offload.release_big_buffers()


def test_settling_the_heap_freezes_what_is_alive_and_lets_a_replaced_config_go() -> None:
    """serve calls offload.settle_heap at start and after each reload (gc.freeze for short pauses);
    a configuration replaced by a reload must still be collectable, cycles included."""
    import gc
    import weakref

    from relay import offload

    class Node:
        other: object = None

    old = Node()
    old.other = Node()
    old.other.other = old  # a cycle, as configuration objects may form
    gone = weakref.ref(old)
    try:
        offload.settle_heap()
        assert gc.get_freeze_count() > 0
        del old
        gc.collect()
        assert gone() is not None  # frozen: the cyclic collector does not see it
        offload.settle_heap()  # the next reload
        assert gone() is None
    finally:
        gc.unfreeze()


searches = st.sampled_from([b"\r\n", b"\r\n.", b"\r\n.\r\n", b"\n", b"\r", b"--m", b"a", b""])


@settings(max_examples=1500, deadline=None)
@given(octets, searches, st.integers(0, 70), st.integers(0, 70))
def test_the_accelerated_searches_answer_as_the_bytes_methods(data: bytes, needle: bytes, start: int, end: int
                                                              ) -> None:
    """wire.FIND/RFIND/COUNT (StringZilla when installed) against bytes.find/rfind/count, on
    bytes and on the reader's bytearray: what the smuggling and line checks rest on."""
    for buf in (data, bytearray(data)):
        assert wire.FIND(buf, needle, start, end) == data.find(needle, start, end)
        assert wire.RFIND(buf, needle, start, end) == data.rfind(needle, start, end)
        if needle:
            assert wire.COUNT(buf, needle, start, end) == data.count(needle, start, end)


def test_the_accelerated_searches_on_long_data() -> None:
    """Long inputs take the library's SIMD paths (16-64 octet blocks): needles at every offset
    around block edges, and none at all."""
    import random

    rng = random.Random(14)
    for _ in range(300):
        buf = bytearray(b"QUJD" * rng.randint(0, 1500))
        for _ in range(rng.randint(0, 4)):
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = rng.choice([b"\r\n", b"\r\n.", b"\n", b"\r", b"\r\n.\r\n"])
        data = bytes(buf)
        for needle in (b"\r\n", b"\r\n.", b"\n", b"\r", b"\r\n.\r\n"):
            s = rng.randrange(len(data) + 1)
            assert wire.FIND(data, needle, s, len(data)) == data.find(needle, s)
            assert wire.RFIND(data, needle, 0, s) == data.rfind(needle, 0, s)
            assert wire.COUNT(data, needle, 0, len(data)) == data.count(needle)


@settings(max_examples=400, deadline=None)
@given(octets, st.integers(min_value=0, max_value=24))
def test_the_bytes_fallback_gives_the_same_answers(data: bytes, n: int) -> None:
    """Where StringZilla cannot be imported, relay.wire uses the bytes methods: same answers."""
    saved = wire.FIND, wire.RFIND, wire.COUNT, wire.SPLIT_BELOW, wire.PAIRED
    wire.FIND, wire.RFIND, wire.COUNT = wire._bytes_find, wire._bytes_rfind, wire._bytes_count
    wire.SPLIT_BELOW, wire.PAIRED = 0, wire._paired_counted
    try:
        line_checks(data, n)
        crlf = data.count(b"\r\n")
        assert wire.crlf_only(data) == (data.count(b"\n") == crlf and data.count(b"\r") == crlf)
        assert wire.find(data, b"\r\n.", 0, len(data)) == data.find(b"\r\n.")
    finally:
        wire.FIND, wire.RFIND, wire.COUNT, wire.SPLIT_BELOW, wire.PAIRED = saved


def test_stringzilla_is_what_the_relay_runs_with() -> None:
    """The dependency is installed by the project's own files: the fast path is the tested one."""
    assert wire.BACKEND == "stringzilla" and wire.FIND is not wire._bytes_find and wire.PAIRED is wire._paired_mapped
