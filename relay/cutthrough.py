"""Cut-through delivery of a big message: the tenant's endpoint gets the message while it arrives,
and the final dot only once the whole message proved to be what the store-and-forward path
would have sent (issue #14: the 25 MB target).

A big message costs the relay, one after another: receiving it, its checks and stamping, then
writing it to the endpoint at the endpoint's pace. With store and forward the last step starts
only when the first two are over; here it starts once the first ``delivery.cut_through_after``
bytes are in, and runs beside the rest:

1. **Speculate** (:func:`speculate`, pure). From the first bytes of a ``multipart/mixed``
   message whose text parts are complete and which is now inside a later, non-text part (an
   attachment): close that part and the message there, and run the one flow
   (:func:`relay.flow.bind_and_plan`) on the result. Its output up to the cut is the *head*;
   what follows the cut in the real message is meant to go out as received.
2. **Stream** (:class:`CutThrough`). Open a transaction to the tenant's endpoint (MAIL, RCPT,
   DATA answered 354: :meth:`relay.delivery.client.Delivery.open_stream`), write the head, then
   each further run of complete lines as the DATA reader finds it. Nothing reaches the wire that
   store and forward would not send: a run holding a bare CR or LF (the SMTP smuggling
   variants), a line starting with a dot, or 8-bit data after a 7-bit MAIL stops the cut-through
   before it is written.
3. **Verify, then the dot** (:meth:`CutThrough.finish`). When the message is complete, the
   relay runs the one flow on it as always. Only when that gives exactly one copy, for the same
   tenant and recipients, whose bytes are the head followed by the rest of the message as
   received, is the final dot sent; the client gets its 250 after the endpoint's, as always.
   Anything else (the tail made the MIME malformed, a rule looked at the attachment, the
   message is too big or has a line too long, the client went away, the endpoint failed) closes
   the endpoint connection without the dot: RFC 5321 §3.3 / §4.1.1.4, a transaction is only
   complete with the dot, and a server that loses the connection keeps nothing (§3.8). The
   message then goes out as it always would, or the client gets its error.

The MAIL command of a cut-through has no SIZE parameter (RFC 1870: optional; the size is not
known yet); everything else (SMTPUTF8, BODY=8BITMIME) is what store and forward would send, and
:meth:`CutThrough.finish` checks it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from relay import binding, ingress, offload, pipeline, replies, wire
from relay.errors import RelayError, TransientError
from relay.mime.scanner import scan

if TYPE_CHECKING:
    from relay.config import Config, Tenant
    from relay.delivery.client import Delivery, Outcome, Stream
    from relay.flow import Prepared

# What is written at a time: complete lines, at most this much (and a line longer than this
# ends the cut-through: store and forward takes over).
CHUNK = wire.CHUNK
HOLD_MAX = 0.05  # seconds the client's content may wait while the cut-through starts


@dataclass(frozen=True)
class Head:
    """What :func:`speculate` worked out from the first part of a message."""

    tenant: Tenant
    recipients: tuple[str, ...]
    head: bytes  # the output up to ``cut``: our trace fields and the (stamped) message up to there
    cut: int  # offset in the content where the rest goes out as received (a line start)
    ascii: bool  # the head is US-ASCII: MAIL without BODY=8BITMIME, and the rest must be too
    decision: str


def speculate(cfg: Config, prefix: bytes, *, plan: Callable[..., Prepared], mail_from: str, rcpts: Sequence[str],
              peer: binding.Peer, when: dt.datetime, received_for: Callable[[Sequence[str]], bytes]
              ) -> Head | str:
    """The head of the message whose content starts with ``prefix``, or why there is none. Pure.

    ``prefix`` (as the DATA reader holds it: no line may start with a dot) is cut back to its
    last CRLF. The message must be ``multipart/mixed`` and the prefix must end inside its last
    part so far, a part that is neither text nor multipart and whose header is complete (the text
    parts the stamper edits all lie before it). That part and the message are closed right there,
    the one flow (``plan``: :func:`relay.flow.bind_and_plan`) runs on the result, and its single
    copy must end with the part's body bytes as they were, then the close delimiter: then all
    before the close delimiter is the head, and the message from the cut on goes out as received."""
    end = prefix.rfind(b"\r\n")
    if end < 0:
        return "no complete line"
    prefix = prefix[:end + 2]
    if prefix.startswith(b".") or wire.find(prefix, b"\r\n.") >= 0:
        # The DATA reader's buffer is still dot-stuffed (RFC 5321 §4.5.2): only where no line
        # starts with a dot are its octets the content's, at the content's offsets.
        return "a line starting with a dot"
    settings = pipeline.Settings.of(cfg)
    s = scan(prefix, settings.limits, crlf=True)
    root = s.root
    if root.ctype != "multipart/mixed" or root.boundary is None or not root.children:
        return f"not multipart/mixed ({root.ctype})"
    if root.close_at is not None:
        return "the message ended in the prefix"
    last = s.parts[root.children[-1]]
    if last.maintype in ("text", "multipart", "message"):
        return f"the cut falls in a {last.ctype} part"
    body = last.header_end
    if body >= len(prefix) or prefix[body - 2:body] != b"\r\n":
        return "the last part's header is not complete"
    close = b"--" + root.boundary + b"--\r\n"
    try:
        inbound = ingress.accept(prefix + close, settings.ingress)
        if inbound.normalised:
            return "bare CR or LF in the first part"
        prepared = plan(cfg, inbound, mail_from, list(rcpts), peer, when, received_for)
    except RelayError as e:
        return f"refused: {e.reply.code}"
    copies = prepared.copies
    if len(copies) != 1:
        return f"{len(copies)} copies"
    out = copies[0].processed.data
    kept = prefix[body:] + close
    if not out.endswith(kept):
        return "the stamper changed the part at the cut"
    head = out[:len(out) - len(close)]
    if not wire.crlf_only(head):
        return "the head is not CRLF-only"
    return Head(prepared.binding.tenant, tuple(copies[0].recipients), head, len(prefix), head.isascii(),
                str(copies[0].processed.decision))


def same_output(pieces: Sequence[wire.Piece], head: bytes, tail: memoryview) -> bool:
    """Whether ``pieces`` joined are ``head`` then ``tail``: compared in place, a slice of at most
    :data:`relay.wire.SLICE` at a time (no joined copy, and the event loop gets its turns)."""
    if wire.size_of(tuple(pieces)) != len(head) + len(tail):
        return False
    want = [memoryview(head), tail]
    w, at = 0, 0  # position in ``want``
    for piece in pieces:
        view = piece if isinstance(piece, memoryview) else memoryview(piece)
        p = 0
        while p < len(view):
            cur = want[w]
            n = min(len(view) - p, len(cur) - at, wire.SLICE)
            if not wire.EQUAL(view[p:p + n], cur[at:at + n]):
                return False
            p, at = p + n, at + n
            if at == len(cur):
                w, at = w + 1, 0
    return True


class CutThrough:
    """One DATA transaction's cut-through (see the module docstring). The DATA reader tells it
    what it has (:meth:`progress`, then :meth:`final` or :meth:`abort`); the flow ends it with
    :meth:`finish` (the dot, when everything checks out) or :meth:`close`."""

    def __init__(self, *, after: int, qid: str, when: dt.datetime, start: Callable[[bytes], Head | str],
                 delivery: Delivery, smtputf8: bool, mail_from: str, timeout: float) -> None:
        self.after, self.qid, self.when = after, qid, when
        self._speculate = start  # prefix -> Head | str (offload.run_sized: in the big-message thread if big)
        self._delivery, self._smtputf8, self._mail_from, self._timeout = delivery, smtputf8, mail_from, timeout
        self._buf: bytearray | None = None  # the reader's buffer: CRLF + content so far
        self._content: bytes | bytearray | None = None  # the whole content, once final
        self.known = 0  # content octets known (more may follow until final)
        self.proven = 0  # content octets the DATA reader found free of a bare CR or LF
        self._more = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.head: Head | None = None
        self._stream: Stream | None = None
        self.off: str | None = None  # why there is no cut-through (None: on, or not started)
        self.outcome: str | None = None  # for the log line: "delivered", or "off: why"
        self.timed_out: TransientError | None = None  # the endpoint stopped taking the message
        # Pauses (True) and resumes (False) reading the client's content (set by the DATA reader).
        self.hold: Callable[[bool], None] | None = None
        self._held: asyncio.TimerHandle | None = None

    # --- what the DATA reader tells it ------------------------------------------------------------

    def progress(self, buf: bytearray, offset: int, crlf: int = 0) -> None:
        """``buf`` (the reader's buffer: CRLF, then the content) is content up to ``offset``, and
        holds no bare CR or LF up to ``crlf`` (:class:`relay.wire.CrlfCheck`; 0: not known)."""
        if self.off is not None:
            return
        self._buf, self.known = buf, max(self.known, offset - 2)
        self.proven = max(self.proven, crlf - 2)
        if self._task is None and self.known >= self.after:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run())
            if self.hold is not None:
                # A client faster than the relay keeps the event loop reading (uvloop reads up to
                # 32 times per wake-up): the speculation and the endpoint's replies would each
                # wait that long, and the message would be in before the first octet went out.
                # Reading pauses until the endpoint answered DATA, for HOLD_MAX at most.
                self.hold(True)
                self._held = loop.call_later(HOLD_MAX, self._release)
        self._more.set()

    @property
    def holding(self) -> bool:
        """Reading from the client is paused by this cut-through (until the endpoint answered DATA)."""
        return self._held is not None

    def _release(self) -> None:
        if self._held is not None:
            self._held.cancel()
            self._held = None
            if self.hold is not None:
                self.hold(False)

    def final(self, content: bytes | bytearray, crlf: bool = False) -> None:
        """The content is complete: ``content`` (no longer the reader's buffer; its own offsets);
        ``crlf``: the reader found no bare CR or LF in it."""
        if self.off is not None:
            return
        self._buf, self._content, self.known = None, content, len(content)
        if crlf:
            self.proven = len(content)
        self._more.set()

    def abort(self, why: str) -> None:
        """No cut-through for this message (before any dot): the endpoint connection is closed."""
        self._release()
        if self.off is None:
            self.off = why
            self.outcome = self.outcome or (f"off: {why}" if self._task is not None else None)
        if self._task is not None and not self._task.done() and self._task is not asyncio.current_task():
            self._task.cancel()  # (the writer stopping itself just returns)
        if self._stream is not None:
            self._stream.abort()
            self._stream = None
        self._buf = self._content = None  # nothing more is written: the message is let go of
        self._more.set()

    # --- the flow's end of it ---------------------------------------------------------------------

    async def finish(self, tenant: Tenant, recipients: Sequence[str], pieces: Sequence[wire.Piece],
                     ascii: bool, smtputf8: bool) -> Outcome | None:
        """The endpoint's outcome for this copy, the dot sent, when the one flow's output
        (``pieces``, for ``tenant`` and ``recipients``) is what was written plus the rest of the
        message; None (connection closed, nothing delivered) for the caller to deliver as always.
        Raises what delivery raises for the endpoint's reply to the dot, and the endpoint's
        timeout when it stopped taking the message."""
        if self.timed_out is not None:
            self._timed_out()
        if self._task is None or self.off is not None or self._content is None:
            self.abort(self.off or "not started")
            return None
        await self._written()
        h, stream = self.head, self._stream
        if self.off is not None or h is None or stream is None:
            return None
        why = await self._differs(h, tenant, recipients, pieces, ascii, smtputf8)
        if why is not None:
            self.abort(why)
            return None
        self._stream = None
        try:
            outcome = await stream.finish()
        except RelayError as e:
            self.outcome = f"the endpoint answered the dot {e.reply.code}"
            raise
        self.outcome = "delivered"
        return outcome

    async def _written(self) -> None:
        """Until the writer has written everything but the dot (or stopped)."""
        assert self._task is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self._timeout)
        except TimeoutError:
            # Store and forward would wait as long again for the same endpoint: a 4xx, and the
            # client retries (RFC 5321 §4.5.3.2.6: data_timeout is the wait for the whole DATA).
            self.abort("the endpoint took too long")
            self.timed_out = TransientError(replies.ENDPOINT_TIMEOUT,
                                            f"cut-through: the endpoint took over {self._timeout:g} s for the message")
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise  # this flow is being cancelled, not only the writer
        if self.timed_out is not None:
            self._timed_out()

    def _timed_out(self) -> NoReturn:
        """The endpoint stopped taking the message: counted as a delivery error, raised for the 4xx."""
        assert self.timed_out is not None
        if self.head is not None:
            self._delivery.count_error(self.head.tenant, self.timed_out)
        raise self.timed_out

    async def _differs(self, h: Head, tenant: Tenant, recipients: Sequence[str], pieces: Sequence[wire.Piece],
                       ascii: bool, smtputf8: bool) -> str | None:
        """Why the one flow's copy is not what was sent (transaction and bytes), or None."""
        if tenant.name != h.tenant.name or tuple(recipients) != h.recipients:
            return "another tenant or recipients"
        if ascii != h.ascii or smtputf8 != self._smtputf8:
            return "another BODY or SMTPUTF8"
        assert self._content is not None
        with memoryview(self._content) as view, view[h.cut:] as tail:
            same = await offload.run_sized(len(tail), same_output, pieces, h.head, tail)
        return None if same else "the message is not what was sent"

    def close(self) -> None:
        """The transaction is over: a cut-through still open is abandoned (no dot), and the
        message is let go of (whatever still refers to this object keeps no 25 MB alive)."""
        if self._stream is not None or (self._task is not None and not self._task.done()):
            self.abort(self.off or "not used")
        self._buf = self._content = None

    # --- the writer ---------------------------------------------------------------------------------

    def _bytes(self, a: int, b: int) -> bytes:
        """Content octets [a, b) as a copy (the reader's buffer grows meanwhile)."""
        src = self._content if self._content is not None else self._buf
        shift = 0 if self._content is not None else 2
        assert src is not None
        with memoryview(src) as view:
            return bytes(view[a + shift:b + shift])

    async def _run(self) -> None:
        try:
            await self._stream_all()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the endpoint failed mid-way, or anything else: store and forward
            why = e.detail if isinstance(e, RelayError) else f"{type(e).__name__}: {e}"
            if isinstance(e, TransientError) and e.reply == replies.ENDPOINT_TIMEOUT:
                # An endpoint that took data_timeout to take one chunk would keep store and forward
                # as long again: finish() gives the client the 4xx instead (see there).
                self.timed_out = e
            self.abort(why)

    async def _stream_all(self) -> None:
        # The first ``after`` octets, however many have arrived by now: the text parts are meant to be
        # in there, and everything after the cut is checked and written a chunk at a time.
        prefix = self._bytes(0, min(self.known, self.after))
        got = await offload.run_sized(len(prefix), self._speculate, prefix)
        if isinstance(got, str):
            self.abort(got)
            return
        assert isinstance(got, Head)
        self.head = got
        stream = await self._delivery.open_stream(got.tenant, self._mail_from, got.recipients,
                                                  smtputf8=self._smtputf8, ascii=got.ascii)
        if isinstance(stream, str):
            self.abort(stream)
            return
        if self.off is not None:  # aborted while the endpoint answered
            stream.abort()
            return
        self._stream = stream
        self._release()
        await stream.write(wire.stuff(got.head))
        pos = got.cut
        while self.off is None:
            if pos < self.known:
                end = min(self.known, pos + CHUNK)
                chunk = self._bytes(pos, end)
                cut = chunk.rfind(b"\r\n") + 2
                if cut < 2:
                    if end - pos >= CHUNK:
                        self.abort(f"a line over {CHUNK} octets")
                        return
                else:
                    chunk = chunk[:cut]
                    why = _unsafe(chunk, got.ascii, pos + cut <= self.proven)
                    if why is not None:
                        self.abort(why)
                        return
                    await stream.write(chunk)
                    pos += cut
                    continue
            if self._content is not None and pos >= self.known:
                return  # everything is written but the dot
            self._more.clear()
            await self._more.wait()


def _unsafe(chunk: bytes, ascii: bool, crlf: bool = False) -> str | None:
    """Why ``chunk`` (whole lines, starting a line) must not be written, or None. What store and
    forward would send differently: a bare CR or LF (normalised by ingress, and the stuff of
    SMTP smuggling), a line starting with a dot (stuffed), 8-bit data after a 7-bit MAIL.
    ``crlf``: the DATA reader already found no bare CR or LF in the content up to the chunk's
    end (its lines start after a CRLF of that content, so the chunk has none either)."""
    if not crlf and not wire.crlf_only(chunk):
        return "bare CR or LF"
    if chunk.startswith(b".") or wire.find(chunk, b"\r\n.") >= 0:
        return "a line starting with a dot"
    if ascii and not chunk.isascii():
        return "8-bit data after a 7-bit MAIL"
    return None

