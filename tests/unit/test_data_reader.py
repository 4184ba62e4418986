"""The buffer-wise DATA reader (issue #14) gives exactly what aiosmtpd's line-by-line loop gives.

The reference below is aiosmtpd 1.4.6's ``smtp_DATA`` loop (line-by-line ``readuntil(b"\\r\\n")``,
size and line limits, dot-unstuffing), reduced to its result. Both read the same bytes, fed to a
real ``asyncio.StreamReader`` in random chunk sizes; whatever follows the final dot must stay in
the reader for the next command.
"""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.server import RelaySMTP

LINE_LIMIT = 64
SIZE_LIMIT = 400


async def reference(reader: asyncio.StreamReader) -> tuple[bytes, str | None]:
    data: list[bytearray] = []
    num, state = 0, "ok"
    fragments: list[bytes] = []
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as e:
            state = "long" if state == "ok" else state
            data = []
            line = await reader.read(e.consumed)
        if not fragments and line == b".\r\n":
            break
        num += len(line)
        if state == "ok" and num > SIZE_LIMIT:
            state = "much"
            data = []
        fragments.append(line)
        if line.endswith(b"\r\n"):
            if state == "ok":
                joined = b"".join(fragments)
                if len(joined) > LINE_LIMIT:
                    state, data = "long", []
                else:
                    data.append(bytearray(joined))
            fragments = []
    if state == "long":
        return b"", "500 Line too long (see RFC5321 4.5.3.1.6)"
    if state == "much":
        return b"", "552 Error: Too much mail data"
    for text in data:
        if text.startswith(b"."):
            del text[0]
    return b"".join(data), None


async def trickle(reader: asyncio.StreamReader, stream: bytes, cuts: list[int]) -> None:
    """Feed ``stream`` in the pieces ``cuts`` makes, each after the reader had its turn: the
    reader sees the message grow as it does from a network (feed() hands it all at once)."""
    pos = 0
    for c in [*sorted(set(cuts)), len(stream)]:
        reader.feed_data(stream[pos:c])
        pos = max(pos, c)
        for _ in range(3):
            await asyncio.sleep(0)
    reader.feed_eof()


def feed(stream: bytes, cuts: list[int]) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    pos = 0
    for c in sorted(set(cuts)):
        reader.feed_data(stream[pos:c])
        pos = c
    reader.feed_data(stream[pos:])
    reader.feed_eof()
    return reader


def reading(reader: asyncio.StreamReader, size_limit: int, line_limit: int) -> Any:
    """What RelaySMTP._read_content reads of its session: the reader, the limits, no handler (so no
    cut-through), no transport."""
    return SimpleNamespace(_reader=reader, data_size_limit=size_limit, line_length_limit=line_limit, _writer=None,
                           event_handler=None, envelope=None, session=None, transport=None)


BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")  # a CR or LF that is not half of a CRLF (the oracle)


async def ours(reader: asyncio.StreamReader) -> tuple[bytes | bytearray, str | None]:
    fake: Any = reading(reader, SIZE_LIMIT, LINE_LIMIT)
    content, problem, dotless, crlf = await RelaySMTP._read_content(fake)
    if dotless:  # sound: delivery skips its dot-stuffing search on this word (RFC 5321 §4.5.2)
        assert problem is None and not content.startswith(b".") and b"\r\n." not in content
    # Sound (ingress skips its normalisation on this word: a bare LF let through is SMTP
    # smuggling towards the tenant) and exact (else it saves nothing).
    assert crlf == (problem is None and BARE.search(content) is None)
    return content, problem


PIECES = st.sampled_from([b"a", b"x" * 30, b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"\r\r\n",
                          b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\xc3\xa9", b"\x00", b" "])


@settings(max_examples=400, deadline=None)
@given(st.lists(PIECES, max_size=40), st.lists(st.integers(0, 2000), max_size=6),
       st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"]), st.booleans())
def test_same_content_and_verdict_as_aiosmtpd(pieces: list[bytes], cuts: list[int], after: bytes,
                                              windows: bool) -> None:
    from relay import wire

    split_below = wire.SPLIT_BELOW
    if windows:
        wire.SPLIT_BELOW = 0  # the line check a big message gets, on these small ones
    try:
        same_as_aiosmtpd(b"".join(pieces), cuts, after)
    finally:
        wire.SPLIT_BELOW = split_below


def same_as_aiosmtpd(body: bytes, cuts: list[int], after: bytes) -> None:
    stream = body + b"\r\n.\r\n" + after  # ends like every message; may also end earlier inside body

    async def both() -> None:
        r1, r2 = feed(stream, cuts), feed(stream, cuts)
        want = await reference(r1)
        got = await ours(r2)
        assert got == want
        # the rest (pipelined commands) is left for the command loop, byte for byte
        assert await r2.read() == await r1.read()

    asyncio.run(both())


@settings(max_examples=400, deadline=None)
@given(st.lists(PIECES, max_size=40), st.lists(st.integers(0, 1300), max_size=10),
       st.sampled_from([b"", b"QUIT\r\n", b"NOOP\nQUIT\r\n", b"\n"]))
def test_the_same_when_the_message_arrives_in_pieces(pieces: list[bytes], cuts: list[int], after: bytes) -> None:
    """As from a network: the reader works on a buffer that grows between its turns (its line
    endings checked a piece at a time, wire.CrlfCheck), and says what the whole-buffer reader
    says. What follows the final dot (here with a bare LF) is no part of the content's check."""
    stream = b"".join(pieces) + b"\r\n.\r\n" + after

    async def both() -> None:
        r1 = feed(stream, [])
        want = await reference(r1)
        r2 = asyncio.StreamReader(limit=LINE_LIMIT)
        feeder = asyncio.create_task(trickle(r2, stream, cuts))
        got = await ours(r2)
        await feeder
        assert got == want
        assert await r2.read() == await r1.read()

    asyncio.run(both())


def test_empty_message_and_leading_dots() -> None:
    async def run(stream: bytes) -> tuple[bytes | bytearray, str | None]:
        return await ours(feed(stream, []))

    assert asyncio.run(run(b".\r\n")) == (b"", None)
    assert asyncio.run(run(b"..\r\n...x\r\n.\r\n")) == (b".\r\n..x\r\n", None)
    assert asyncio.run(run(b"a\r\n.\r\nQUIT\r\n")) == (b"a\r\n", None)
    # a dot after a bare LF or CR is not the end (the smuggling shapes stay inside the message)
    assert asyncio.run(run(b"a\n.\nb\r.\r\n\r\n.\r\n")) == (b"a\n.\nb\r.\r\n\r\n", None)
    assert asyncio.run(run(b"x" * 70 + b"\r\n.\r\n"))[1] == "500 Line too long (see RFC5321 4.5.3.1.6)"
    assert asyncio.run(run(b"y\r\n" * 200 + b".\r\n"))[1] == "552 Error: Too much mail data"


def test_a_message_over_the_offload_size_gets_the_same_answers() -> None:
    """Over offload.OFFLOAD_BYTES the line check and unstuffing run in a worker thread: same results."""
    from relay import offload

    async def run(stream: bytes) -> tuple[bytes | bytearray, str | None]:
        reader = asyncio.StreamReader(limit=LINE_LIMIT)
        reader.feed_data(stream)
        reader.feed_eof()
        fake: Any = reading(reader, 10 * offload.OFFLOAD_BYTES, 1001)
        content, problem, dotless, crlf = await RelaySMTP._read_content(fake)
        assert crlf == (problem is None and BARE.search(content) is None)
        assert not dotless or (not content.startswith(b".") and b"\r\n." not in content)
        return content, problem

    lines = b"".join(b"%s%d\r\n" % (b"." if i % 97 == 0 else b"", i) * 3 for i in range(30_000))
    assert len(lines) > offload.OFFLOAD_BYTES
    stuffed = b"." + lines.replace(b"\r\n.", b"\r\n..")  # the first line starts with a dot too
    assert asyncio.run(run(stuffed + b".\r\n")) == (lines, None)
    assert asyncio.run(run(lines + b"z" * 1000 + b"\r\n.\r\n"))[1] == "500 Line too long (see RFC5321 4.5.3.1.6)"


def test_the_reader_says_dotless_only_when_no_line_starts_with_a_dot() -> None:
    """What delivery's dot-stuffing relies on (issue #14: the 25 MB search it saves)."""
    async def run(stream: bytes) -> bool:
        fake: Any = reading(feed(stream, [3]), SIZE_LIMIT, LINE_LIMIT)
        return (await RelaySMTP._read_content(fake))[2]

    assert asyncio.run(run(b"a\r\nb.\r\n.\r\n"))
    assert asyncio.run(run(b"a\n.b\r\n.\r\n"))  # bare LF: dotless by CRLF lines; ingress then says no (normalised)
    assert not asyncio.run(run(b"..a\r\n.\r\n"))  # the first line
    assert not asyncio.run(run(b"a\r\n..\r\n.\r\n"))


def test_a_big_message_is_the_readers_own_buffer_and_what_follows_stays_for_the_next_command() -> None:
    """Over OFFLOAD_BYTES, with nothing to unstuff, the content is the reader's buffer trimmed in
    place (no copy, issue #14); the reader carries on with a new buffer holding the pipelined
    commands that followed the final dot."""
    from relay import offload

    async def run() -> None:
        reader = asyncio.StreamReader(limit=LINE_LIMIT)
        body = b"QUJD" * 19 + b"\r\n"
        content = b"Subject: big\r\n\r\n" + body * (offload.OFFLOAD_BYTES // len(body) + 10)
        stream = content + b".\r\nMAIL FROM:<a@b>\r\nQUIT\r\n"
        for i in range(0, len(stream), 65536):  # as it arrives: the end found across feeds
            reader.feed_data(stream[i:i + 65536])
        reader.feed_eof()
        before = reader._buffer  # type: ignore[attr-defined]
        fake: Any = reading(reader, 10 * offload.OFFLOAD_BYTES, 1001)
        got, problem, dotless, crlf = await RelaySMTP._read_content(fake)
        assert (got, problem, dotless, crlf) == (content, None, True, True)
        assert got is before and reader._buffer is not before  # type: ignore[attr-defined]
        assert await reader.readline() == b"MAIL FROM:<a@b>\r\n"
        assert await reader.read() == b"QUIT\r\n"

    asyncio.run(run())
