"""SMTP DATA transparency (RFC 5321 §4.5.2) and the line-length check (§4.5.3.1.6) on whole
messages, at C speed and without copying a message more than once (issue #14). Pure.

A 25 MB message read and sent the obvious way (``split`` to find the longest line, ``replace``
then slice to unstuff, ``replace`` then concatenate to stuff, one ``write`` that the transport
buffers) is copied five or six times and splits into 300 000 small objects; these helpers find
the same answers with ``bytes.find`` and hand the transport slices of the message itself.
"""

from __future__ import annotations

from collections.abc import Iterator

CHUNK = 1 << 18  # pieces of about 256 KiB: big enough to cost nothing per piece, small to buffer


# Whole-message scans go a slice at a time: a C call holds the GIL until it returns, and one
# count over 25 MB (30 ms) running in a worker thread stalls the event loop for all of it; between
# 1 MiB slices the loop gets its turn.
SLICE = 1 << 20
SPLIT_BELOW = 1 << 16  # line_longer_than splits up to this size (faster than its windows there)


Buffer = bytes | bytearray


def crlf_only(raw: bytes) -> bool:
    """Every CR and LF in ``raw`` is part of a CRLF pair (C-speed counts, no copy; about 2 ms per
    MB, so a caller that can prove it another way should)."""
    size, a = len(raw), 0
    while a < size:
        b = min(size, a + SLICE)
        if raw[b - 1:b] == b"\r":
            b = min(size, b + 1)  # keep a CRLF in one slice
        crlf = raw.count(b"\r\n", a, b)
        if raw.count(b"\n", a, b) != crlf or raw.count(b"\r", a, b) != crlf:
            return False
        a = b
    return True


def find(raw: Buffer, needle: bytes, start: int = 0, end: int | None = None) -> int:
    """``raw.find(needle, start, end)``, a slice at a time (see :data:`SLICE`)."""
    end = len(raw) if end is None else min(end, len(raw))
    a = start
    while a < end:
        b = min(end, a + SLICE + len(needle) - 1)  # overlap: a match across the cut is found
        i = raw.find(needle, a, b)
        if i >= 0 or b == end:
            return i
        a = b - len(needle) + 1
    return -1 if needle or start > end else start


def line_longer_than(data: Buffer, n: int, end: int | None = None, sep: bytes = b"\r\n") -> bool:
    """Whether some ``sep``-separated segment of ``data[:end]`` is longer than ``n`` octets.

    Same answer as ``max(map(len, data[:end].split(b"\\r\\n"))) > n`` without splitting (or
    copying). A segment of at least ``n + 1`` octets covers a whole aligned window of
    ``w = (n + 1) // 2`` octets (the first window starting in it ends before
    ``s + 2w <= s + n + 1``), and such a window holds no CRLF. So only windows with no CRLF
    inside need a closer look: the CRLF-free run around them.
    """
    size = len(data) if end is None else end
    if size <= n:
        return False
    if n < 1 or size <= SPLIT_BELOW:  # small: splitting is quicker than the windows, and as cheap in memory
        return max(map(len, (data if end is None else data[:size]).split(sep))) > n
    w = (n + 1) // 2
    a = 0
    while a + w <= size:
        if data.find(sep, a, a + w) < 0:
            # the run around this window: from after the separator before it to the one after it
            s = data.rfind(sep, 0, a + w)
            e = data.find(sep, a, size)
            if (size if e < 0 else e) - (0 if s < 0 else s + len(sep)) > n:
                return True
        a += w
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


def stuffed_pieces(data: bytes, size: int = CHUNK, *, dotless: bool = False) -> Iterator[bytes | memoryview]:
    """``data`` (CRLF line ends, ending with CRLF) dot-stuffed and terminated with ``.CRLF``, in
    pieces of about ``size`` octets to write one after another.

    §4.5.2: a line that starts with a dot gets one more. Pieces end after a CRLF where the message
    has one within ``size`` octets (and never between CR and LF), so every ``CRLF.`` lies inside
    one piece or starts the next; a piece with no dot to add is a ``memoryview`` of ``data`` (no
    copy). A message of one piece comes as one ``bytes`` (one write on the wire). ``dotless``:
    the caller has proved no line of ``data`` starts with a dot (the DATA reader saw none and the
    stamper's splices add none, :attr:`relay.mime.stamper.StampResult.dotless`), so the pieces
    are not searched: 20 ms on the event loop for a 25 MB message.
    """
    n = len(data)
    if dotless and n > size:
        view = memoryview(data)
        for a in range(0, n, size):
            yield view[a:a + size]  # a cut anywhere is fine: there is no CRLF. to keep whole
        yield b".\r\n"
        return
    if n <= size:
        head = b"." if data.startswith(b".") else b""
        yield head + data.replace(b"\r\n.", b"\r\n..") + b".\r\n"
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
        if lead or data.find(b"\r\n.", a, b) >= 0:
            yield (b"." if lead else b"") + data[a:b].replace(b"\r\n.", b"\r\n..")
        else:
            yield view[a:b]
        line_start = data[b - 2:b] == b"\r\n"
        a = b
    yield b".\r\n"
