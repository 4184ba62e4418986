"""SMTP DATA transparency (RFC 5321 §4.5.2) and the line-length check (§4.5.3.1.6) on whole
messages, at C speed and without copying a message more than once (issue #14). Pure.

A 25 MB message read and sent the obvious way (``split`` to find the longest line, ``replace``
then slice to unstuff, ``replace`` then concatenate to stuff, one ``write`` that the transport
buffers) is copied five or six times and splits into 300 000 small objects; these helpers find
the same answers with ``bytes.find`` and hand the transport slices of the message itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

try:
    import stringzilla as _sz
except ImportError:  # a platform without its wheel: the bytes methods, same answers, slower
    _sz = None

CHUNK = 1 << 18  # pieces of about 256 KiB: big enough to cost nothing per piece, small to buffer


# Whole-message scans go a slice at a time: a C call holds the GIL until it returns, and one
# count over 25 MB (30 ms) running in a worker thread stalls the event loop for all of it; between
# 1 MiB slices the loop gets its turn.
SLICE = 1 << 20
SPLIT_BELOW = 1 << 16  # line_longer_than splits up to this size (faster than its windows there)


Buffer = bytes | bytearray
Piece = bytes | bytearray | memoryview  # a message handed on as pieces: views of what was received, and what was put in


def size_of(pieces: tuple[Piece, ...]) -> int:
    return sum(len(p) for p in pieces)  # len of a memoryview of bytes is its octet count


def joined(pieces: tuple[Piece, ...]) -> bytes:
    """The pieces as one ``bytes`` (no copy for a single ``bytes`` piece)."""
    if len(pieces) == 1 and isinstance(pieces[0], bytes):
        return pieces[0]
    return b"".join(pieces)


def _bytes_find(buf: Buffer, needle: bytes, start: int, end: int) -> int:
    return buf.find(needle, start, end)


def _bytes_rfind(buf: Buffer, needle: bytes, start: int, end: int) -> int:
    return buf.rfind(needle, start, end)


def _bytes_count(buf: Buffer, needle: bytes, start: int, end: int) -> int:
    return buf.count(needle, start, end)


def _bytes_equal(a: Piece, b: Piece) -> bool:
    # memoryview == memoryview compares item by item (3 ns per octet); bytes == bytes is memcmp
    return bytes(a) == bytes(b)


# The whole-message searches: StringZilla's SIMD find/count where it is installed (a 25 MB
# message: CRLF count 30 -> 6 ms, "CRLF." find 22 -> 1.4 ms), else the bytes methods. CPython's
# own search is slowest where it matters most, for a needle that is absent and ends in a common
# octet: "CRLF." in prose (every full stop) or "gmail_quote" in HTML ("e") run at about 1 GB/s,
# 10-20 times StringZilla's time (6-12 µs on a 10 KB reply, 100-220 µs on 200 KB of HTML). Both give
# bytes.find/bytes.count's answers (start/end clamped, non-overlapping counts); tests/unit/test_wire.py
# checks them against each other. Module attributes, so a test can run either.
FIND: Callable[[Buffer, bytes, int, int], int] = _sz.find if _sz is not None else _bytes_find
RFIND: Callable[[Buffer, bytes, int, int], int] = _sz.rfind if _sz is not None else _bytes_rfind
COUNT: Callable[[Buffer, bytes, int, int], int] = _sz.count if _sz is not None else _bytes_count
EQUAL: Callable[[Piece, Piece], bool] = _sz.equal if _sz is not None else _bytes_equal
BACKEND = "stringzilla" if _sz is not None else "bytes"  # which one runs (a test checks the installed one does)


def _paired_counted(raw: Buffer, start: int, size: int) -> bool:
    """:func:`crlf_only` by counting CR, LF and CRLF (equal counts: every CR and LF is half of a
    pair). The bytes methods' way; StringZilla's counts cost about 6 ms each on a 25 MB message
    (a find per match, 336 000 lines)."""
    a = start
    while a < size:
        b = min(size, a + SLICE)
        if raw[b - 1:b] == b"\r":
            b = min(size, b + 1)  # keep a CRLF in one slice
        crlf = COUNT(raw, b"\r\n", a, b)
        if COUNT(raw, b"\n", a, b) != crlf or COUNT(raw, b"\r", a, b) != crlf:
            return False
        a = b
    return True


# StringZilla's way, with no per-line cost. Every CR is followed by a LF and every LF preceded by a
# CR exactly when, for every octet i of the range but the last, i is a CR if and only if i + 1 is
# a LF, and the first octet is no LF and the last no CR. Two table look-ups (translate, SIMD) map
# the range to "is CR" and, shifted by one, to "is LF", and one memcmp compares the two: 19 -> 3-5
# ms on a 25 MB message.
_IS_CR = bytes(int(i == 13) for i in range(256))
_IS_LF = bytes(int(i == 10) for i in range(256))
PAIRS = 1 << 17  # octets mapped per translate: the two scratch buffers stay in the CPU's cache
MAPPED_FROM = 1024  # below this, counting is quicker (about 1 against 2 µs: fewer calls)
_scratch = threading.local()  # crlf_only runs on the event loop and in offload threads alike


def _paired_mapped(raw: Buffer, start: int, size: int) -> bool:
    if size - start < MAPPED_FROM:
        return _paired_counted(raw, start, size)
    if raw[start] == 10 or raw[size - 1] == 13:
        return False
    got = getattr(_scratch, "views", None)
    if got is None or len(got[0]) != PAIRS:
        got = _scratch.views = (memoryview(bytearray(PAIRS)), memoryview(bytearray(PAIRS)))
    cr, lf = got
    assert _sz is not None
    p, last = start, size - 1  # the pairs (i, i + 1) for i in [start, last)
    while p < last:
        q = min(last, p + PAIRS)
        _sz.translate(raw, _IS_CR, start=p, end=q, out=cr)
        _sz.translate(raw, _IS_LF, start=p + 1, end=q + 1, out=lf)
        if not _sz.equal(cr[:q - p], lf[:q - p]):
            return False
        p = q
    return True


PAIRED: Callable[[Buffer, int, int], bool] = _paired_mapped if _sz is not None else _paired_counted


def crlf_only(raw: Buffer, start: int = 0, end: int | None = None) -> bool:
    """Every CR and LF in ``raw[start:end]`` is part of a CRLF pair within it (C speed, no copy of
    ``raw``; about 0.1 ms per MB with StringZilla, 0.6 without)."""
    size = len(raw) if end is None else min(end, len(raw))
    return start >= size or PAIRED(raw, start, size)


class CrlfCheck:
    """:func:`crlf_only` of a buffer that grows at its end (the DATA reader's), a piece at a time
    as the octets arrive, so each octet is looked at once and the answer is there when the last
    arrives (issue #14: ingress and the cut-through's writer each took 16 ms for it on a 25 MB
    message, after the fact). ``checked``: ``buf[:checked]`` holds no bare CR or LF, unless
    ``bare``. A check never ends just after a CR (it may be half of a CRLF split between two
    reads), so a LF at ``checked`` is bare, as it should be. The buffer's checked octets must not
    change; one that does (its front dropped) calls :meth:`stop`."""

    __slots__ = ("bare", "checked")

    def __init__(self) -> None:
        self.checked = 0
        self.bare = False

    def upto(self, buf: Buffer, end: int) -> None:
        """Check ``buf`` up to ``end`` (what is there for sure; less if it ends in a CR)."""
        a = self.checked
        if self.bare or end <= a:
            return
        if buf[end - 1] == 13:  # CR: its LF may be in the next read
            end -= 1
            if end <= a:
                return
        if not crlf_only(buf, a, end):
            self.bare = True
            return
        self.checked = end

    def stop(self) -> None:
        """Nothing more can be proved (the buffer changed under the check)."""
        self.bare = True

    def proves(self, end: int) -> bool:
        """``buf[:end]`` holds no bare CR or LF."""
        return not self.bare and self.checked >= end


def find(raw: Buffer, needle: bytes, start: int = 0, end: int | None = None) -> int:
    """``raw.find(needle, start, end)``, a slice at a time (see :data:`SLICE`)."""
    end = len(raw) if end is None else min(end, len(raw))
    a = start
    while a < end:
        b = min(end, a + SLICE + len(needle) - 1)  # overlap: a match across the cut is found
        i = FIND(raw, needle, a, b)
        if i >= 0 or b == end:
            return i
        a = b - len(needle) + 1
    return -1 if needle or start > end else start


def line_longer_than(data: Buffer, n: int, end: int | None = None, sep: bytes = b"\r\n") -> bool:
    """Whether some ``sep``-separated segment of ``data[:end]`` is longer than ``n`` octets.

    Same answer as ``max(map(len, data[:end].split(b"\\r\\n"))) > n`` without splitting (or
    copying). From the start ``p`` of a segment, the last separator that starts within
    ``[p, p + n]`` ends a run of segments of at most ``n`` octets each, and the next segment
    starts after it; when there is none, the segment at ``p`` is longer than ``n`` unless the
    data ends first. One backward search per ``n`` octets or so: about 28 000 on a 25 MB message
    of 76-character lines.
    """
    size = len(data) if end is None else end
    if size <= n:
        return False
    if n < 1 or size <= SPLIT_BELOW:  # small: splitting is quicker, and as cheap in memory
        return max(map(len, (data if end is None else data[:size]).split(sep))) > n
    p, k = 0, len(sep)
    while size - p > n:
        c = RFIND(data, sep, p, min(size, p + n + k))
        if c < 0:
            return True
        p = c + k
    return False


def data_shape(buf: Buffer, end: int, line_limit: int) -> tuple[bool, bool]:
    """For ``buf[:end]`` = CRLF + dot-stuffed content + ``.CRLF`` (a DATA transfer as read, still
    in the reader's buffer): whether a line, CRLF included, is longer than ``line_limit`` octets
    (§4.5.3.1.6), and whether any line of the content starts with a dot (§4.5.2: then it needs
    unstuffing; else the content is ``buf[2:end - 3]`` as it stands)."""
    return line_longer_than(buf, line_limit - 2, end), find(buf, b"\r\n.", 0, end - 3) >= 0


def unstuff(raw: bytes) -> bytes:
    """The content of a DATA transfer from ``raw`` = CRLF + dot-stuffed content + ``.CRLF``.

    §4.5.2: the leading dot of every line is removed (``raw`` starts with the DATA command's CRLF,
    so the first line's counts too). Content with no line starting with a dot, the common case
    (base64 never does), costs one copy: the slice.
    """
    if find(raw, b"\r\n.", 0, len(raw) - 3) < 0:  # only the terminator's "\r\n." (ends at len - 2)
        return raw[2:-3]
    return raw.replace(b"\r\n.", b"\r\n")[2:-2]


def stuff(data: bytes) -> bytes:
    """``data`` (whole lines, starting a line) dot-stuffed, RFC 5321 §4.5.2: a line that starts
    with a dot gets one more. No terminator. Searched first with :data:`FIND`: ``bytes.replace``
    looks for ``CRLF.`` as slowly as ``bytes.find`` does (190 µs on a 200 KB HTML message, where
    StringZilla takes 5), and usually there is none."""
    lead = b"." if data.startswith(b".") else b""
    if find(data, b"\r\n.") < 0:
        return lead + data if lead else data
    return lead + data.replace(b"\r\n.", b"\r\n..")


def _views(piece: Piece, size: int) -> Iterator[Piece]:
    """``piece`` in views of at most ``size`` octets (a cut anywhere: nothing is searched)."""
    if len(piece) <= size:
        yield piece
        return
    view = memoryview(piece)
    for a in range(0, len(view), size):
        yield view[a:a + size]


def stuffed_pieces(data: bytes | tuple[Piece, ...], size: int = CHUNK, *, dotless: bool = False
                   ) -> Iterator[Piece]:
    """``data`` (CRLF line ends, ending with CRLF) dot-stuffed and terminated with ``.CRLF``, in
    pieces of about ``size`` octets to write one after another.

    §4.5.2: a line that starts with a dot gets one more. Pieces end after a CRLF where the message
    has one within ``size`` octets (and never between CR and LF), so every ``CRLF.`` lies inside
    one piece or starts the next; a piece with no dot to add is a ``memoryview`` of ``data`` (no
    copy). A message of one piece comes as one ``bytes`` (one write on the wire). ``dotless``:
    the caller has proved no line of ``data`` starts with a dot (the DATA reader saw none and the
    stamper's splices add none, :attr:`relay.mime.stamper.StampResult.dotless`), so the pieces
    are not searched: 20 ms on the event loop for a 25 MB message. A big message the stamper left
    in pieces (:attr:`relay.mime.stamper.StampResult.pieces`) comes as a tuple, and only with
    ``dotless``: it is written as it stands.
    """
    if isinstance(data, tuple):
        if not dotless:
            raise ValueError("pieces are written as they stand: only a dotless message comes in pieces")
        for piece in data:
            yield from _views(piece, size)
        yield b".\r\n"
        return
    n = len(data)
    if dotless and n > size:
        yield from _views(data, size)
        yield b".\r\n"
        return
    if n <= size:
        yield stuff(data) + b".\r\n"
        return
    view = memoryview(data)
    a, line_start = 0, True
    while a < n:
        b = min(n, a + size)
        if b < n:
            cut = data.rfind(b"\r\n", a, b)
            if cut >= a:
                b = cut + 2
            elif data[b - 1:b + 1] == b"\r\n":
                b += 1  # never split a CRLF: the next piece would start with "\n."
        lead = line_start and data[a:a + 1] == b"."
        if lead or FIND(data, b"\r\n.", a, b) >= 0:
            yield (b"." if lead else b"") + data[a:b].replace(b"\r\n.", b"\r\n..")
        else:
            yield view[a:b]
        line_start = data[b - 2:b] == b"\r\n"
        a = b
    yield b".\r\n"
