"""The aiosmtpd server we run, with the few behaviours aiosmtpd gets wrong for a relay fixed.

* Banner and replies carry no software version (aiosmtpd's default ident is "Python SMTP x.y").
* During DATA, received bytes count as activity: aiosmtpd only re-arms its timeout on a valid
  command, so a large message over a slow link would be cut off mid-transfer.
* While the DATA handler works (inline delivery may legitimately wait 10 minutes for the
  tenant's final reply, RFC 5321 §4.5.3.2.6) the idle timer is held, otherwise aiosmtpd would
  close the connection and cancel the handler (aiosmtpd #110).
* Exceptions become 451 via :func:`relay.replies.reply_for`, never aiosmtpd's 500.

And the connection-level protections of issues #5 and #10, enforced by a :class:`Guard` shared by
all sessions of a listener: allowed networks (554 greeting), total and per-IP connection caps
(421), pregreet ("early talker") detection, an error budget, a minimum DATA rate against
slowloris senders, and a DATA line length limit above RFC 5321's 1000 so that mail Exchange
Online accepted is never refused for a long line (a longer one is a 4xx, never a bounce).

Admission happens at TCP accept, before any TLS work: on implicit-TLS listeners a :class:`TlsGate`
admits or closes the socket first and only then runs a handshake bounded in time, so a flood of
half-open handshakes costs one slot each and no TLS memory for refused peers. A connection slot
is a :class:`Slot`, released exactly once whichever way the session ends (QUIT, peer reset, idle
timeout, abandoned handshake, handler crash).

How it fails: every refusal is a reply line or a closed socket, never an exception to the loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast

import aiosmtpd.smtp
from aiosmtpd.smtp import MISSING, SMTP, syntax

from relay import offload, replies, wire
from relay.config import Listener, Network, SecurityConfig
from relay.smtp import discovery

if TYPE_CHECKING:
    from relay.cutthrough import CutThrough

log = logging.getLogger("relay.smtp")

# MAIL FROM / RCPT TO with a plain <dot-atom@dot-atom> path and keyword parameters (what Exchange
# Online and every test client send): aiosmtpd parses every path with the email package's RFC 5322
# parser and defines a typing.Protocol class on each call, about 5 % of the relay's CPU per
# message. This form is answered directly, exactly as that parser answers it (the address; the
# parameters after the white space it skips); anything else still goes to aiosmtpd.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"[ \t]*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
                          r"(?:[ \t]+(?=[A-Za-z0-9])(.*))?", re.S)
discovery.install(aiosmtpd.smtp)  # method discovery once per class, not per connection


_VERDICTS_KEPT: Final = 4096  # addresses whose allowed-network verdict a Guard remembers


@dataclass
class Guard:
    """Connection admission and per-session budgets, shared by every session of a server."""

    allowed: tuple[Network, ...] = ()  # empty: anyone may connect (the dev sink)
    max_connections: int = 1_000_000
    max_per_ip: int = 1_000_000
    max_errors: int = 1_000_000
    min_data_rate: float = 0.0
    greeting_delay: float = 0.0
    max_line_length: int = 1001
    tls_handshake_timeout: float = 10.0
    active: int = 0
    per_ip: collections.Counter[str] = field(default_factory=collections.Counter)
    draining: bool = False  # stopping: new sessions and new transactions get 421
    # Whether an address string is in ``allowed``: parsing it with ipaddress cost 10-15 µs of
    # every connection (py-spy, connect/EHLO/QUIT load), and Exchange Online connects from a
    # few hundred addresses. Valid for the ``allowed`` it was filled for; bounded.
    _verdicts: dict[str, bool] = field(default_factory=dict, repr=False)
    _verdicts_for: tuple[Network, ...] = field(default=(), repr=False)

    def configure(self, sec: SecurityConfig) -> None:
        """Take the limits of a (new) security configuration; the live counters are kept."""
        self.allowed, self.max_connections, self.max_per_ip = (
            sec.allowed_networks, sec.max_connections, sec.max_connections_per_ip)
        self.max_errors, self.min_data_rate, self.greeting_delay = sec.max_errors, sec.min_data_rate, sec.greeting_delay
        self.max_line_length = sec.max_line_length
        self.tls_handshake_timeout = sec.tls_handshake_timeout

    def admit(self, ip: str | None) -> str | None:
        """None to admit, else the reply to greet with before closing (RFC 5321 §3.1: 554)."""
        if self.draining:
            return str(replies.SHUTTING_DOWN)  # RFC 5321 §3.8: 421 and close; the client retries elsewhere/later
        if self.allowed:
            if self._verdicts_for is not self.allowed:
                self._verdicts, self._verdicts_for = {}, self.allowed
            key = ip or ""
            inside = self._verdicts.get(key)
            if inside is None:
                try:
                    addr = ipaddress.ip_address(key.split("%")[0])
                except ValueError:
                    return "554 5.7.1 Connection refused"
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                    addr = addr.ipv4_mapped
                inside = any(addr in n for n in self.allowed)
                if len(self._verdicts) >= _VERDICTS_KEPT:
                    self._verdicts.clear()
                self._verdicts[key] = inside
            if not inside:
                log.warning("refused connection from %s: not in allowed networks", ip)
                return "554 5.7.1 Connection refused: not an allowed network"
        if self.active >= self.max_connections:
            return "421 4.7.0 Too many connections, try again later"
        if self.per_ip[ip or ""] >= self.max_per_ip:
            return "421 4.7.0 Too many connections from your address, try again later"
        return None

    def slot(self, ip: str | None) -> Slot | str:
        """Admit ``ip`` and take a connection slot, or return the refusal reply."""
        refusal = self.admit(ip)
        return refusal if refusal is not None else Slot(self, ip or "")


class Slot:
    """One admitted connection's share of the guard's counters; :meth:`release` is idempotent,
    so every path that ends a session may call it (issue #10: slots leaked when a nested or
    abandoned TLS handshake ended a session without ``connection_lost``)."""

    def __init__(self, guard: Guard, ip: str) -> None:
        self.guard, self.ip, self.held = guard, ip, True
        guard.active += 1
        guard.per_ip[ip] += 1

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self.guard.active -= 1
        self.guard.per_ip[self.ip] -= 1
        if self.guard.per_ip[self.ip] <= 0:
            del self.guard.per_ip[self.ip]


async def _until_end_of_data(reader: asyncio.StreamReader, buf: bytearray, limit: int,
                             cut: _CutStart | None = None, crlf: wire.CrlfCheck | None = None) -> tuple[int, bool]:
    """Wait until ``buf`` (the reader's buffer) holds ``CRLF.CRLF``; return the offset just past
    it and whether data over ``limit`` was dropped on the way. StreamReader.readuntil's search
    (incremental: each byte is looked at about once), without its copies. Over ``limit``
    everything that cannot hold the separator is dropped as it arrives, so a client sending
    too much costs no memory; it is refused after its final dot. ``cut`` is told how much of
    ``buf`` is content for sure (no separator starts before that offset). ``crlf`` checks the
    line endings of what arrived, up to the end it returns and no further."""
    sep = b"\r\n.\r\n"
    offset, too_much = 0, False
    while True:
        if len(buf) - offset >= len(sep):
            isep = wire.FIND(buf, sep, offset, len(buf))
            if isep >= 0:
                if crlf is not None:
                    crlf.upto(buf, isep + len(sep))
                return isep + len(sep), too_much
            offset = len(buf) + 1 - len(sep)
            if limit and offset > limit + len(sep):
                if cut is not None:
                    cut.abort("over the size limit")  # before the buffer's front goes
                    cut = None
                if crlf is not None:
                    crlf.stop()  # refused anyway; its offsets are gone with the front
                    crlf = None
                too_much = True
                del buf[:offset]
                offset = 0
            else:
                if crlf is not None:
                    crlf.upto(buf, offset)
                if cut is not None and not too_much:
                    cut.progress(buf, offset, crlf)
        if reader._eof:  # type: ignore[attr-defined]
            raise asyncio.IncompleteReadError(bytes(buf), None)
        await reader._wait_for_data("readuntil")  # type: ignore[attr-defined]


class _CutStart:
    """One DATA's cut-through (relay/cutthrough.py), asked of the handler only once ``after``
    octets of content are in: a small message never pays for one.

    The DATA reader runs between the event loop's reads, and a client faster than the relay keeps
    the loop reading: uvloop reads up to 32 times (8 MB) per wake-up, so the reader would see
    256 KiB, then 8 MB, and the endpoint would get its first octet 15 ms into a 25 MB message
    (issue #14). So :meth:`arrived`, called for every read, pauses reading from the client once
    ``after`` octets are in, and the reader gets its turn at once; :meth:`progress` then hands the
    pause to the cut-through (which holds it until the endpoint answered DATA) or resumes."""

    def __init__(self, smtp: RelaySMTP, factory: Callable[[Any, Any], CutThrough | None], after: int) -> None:
        self.smtp, self.factory, self.after = smtp, factory, after
        self.cut: CutThrough | None = None
        self.paused = False  # reading paused by arrived(), not handed over yet

    def arrived(self, buffered: int) -> None:
        """``buffered`` octets are in the reader's buffer (the DATA line's CRLF in front, and at
        most the final ``CRLF.CRLF``'s five after the content)."""
        transport = self.smtp.transport
        if self.cut is None and not self.paused and buffered - 7 >= self.after and transport is not None:
            _hold(cast(asyncio.ReadTransport, transport), True)
            self.paused = True

    def _unpause(self) -> None:
        """The pause arrived() took ends here: resumed, unless the cut-through holds reading now."""
        if self.paused:
            self.paused = False
            transport = self.smtp.transport
            if transport is not None and (self.cut is None or not self.cut.holding):
                _hold(cast(asyncio.ReadTransport, transport), False)

    def progress(self, buf: bytearray, offset: int, crlf: wire.CrlfCheck | None) -> None:
        try:
            if self.cut is None:
                if offset - 2 < self.after:
                    return
                smtp = self.smtp
                self.cut = self.factory(smtp.session, smtp.envelope)
                if self.cut is None:
                    self.after = 2**62
                    return
                if isinstance(smtp.envelope, RelayEnvelope):
                    smtp.envelope.cut = self.cut  # it rides on the envelope to the flow, which sends the dot or not
                if smtp.transport is not None:
                    self.cut.hold = functools.partial(_hold, cast(asyncio.ReadTransport, smtp.transport))
            self.cut.progress(buf, offset, crlf.checked if crlf is not None and not crlf.bare else 0)
        finally:
            self._unpause()

    def final(self, content: bytes | bytearray, crlf: bool) -> None:
        self._done()
        if self.cut is not None:
            self.cut.final(content, crlf)

    def abort(self, why: str) -> None:
        self._done()
        if self.cut is not None:
            self.cut.abort(why)

    def _done(self) -> None:
        """Nothing more is asked of the handler: arrived() never pauses again (the reader may go
        on reading, e.g. to the end of a message over the size limit, without calling progress)."""
        self.after = 2**62
        self._unpause()


def _hold(transport: asyncio.ReadTransport, on: bool) -> None:
    """Pause (``on``) or resume reading from the client, unless the connection is going away."""
    if transport.is_closing():
        return
    if on:
        transport.pause_reading()
    else:
        transport.resume_reading()


class RelayEnvelope(aiosmtpd.smtp.Envelope):
    """aiosmtpd's envelope plus what the DATA reader learnt on its pass over the content."""

    def __init__(self) -> None:
        super().__init__()
        # RFC 5321 §4.5.2: no line of the content started with a dot (none was stuffed), so the
        # relayed copy needs no dot-stuffing search unless the stamper's splices add one.
        self.dotless = False
        # Every CR and LF of the content is half of a CRLF (checked as it arrived), so ingress has
        # nothing to normalise and need not count them again (issue #14).
        self.crlf = False
        self.cut: CutThrough | None = None  # the big-message cut-through (relay/cutthrough.py), if any


class RelaySMTP(SMTP):
    def __init__(self, handler: Any, *, hostname: str, idle_timeout: float, guard: Guard | None = None,
                 slot: Slot | None = None, **kwargs: Any) -> None:
        self.guard = guard or Guard()
        # aiosmtpd sizes its StreamReader from this attribute in __init__: set it first.
        self.line_length_limit = self.guard.max_line_length
        if kwargs.get("loop") is None:
            # aiosmtpd's own default (make_loop) enters warnings.catch_warnings() to call
            # get_event_loop(), some 10 µs of every connection, and changes the process-wide
            # warning filters meanwhile; sessions are made on the running loop.
            with contextlib.suppress(RuntimeError):
                kwargs["loop"] = asyncio.get_running_loop()
        kw = dict(hostname=hostname, ident="ESMTP", timeout=idle_timeout, enable_SMTPUTF8=True, decode_data=False,
                  # We relay for Exchange Online, which never authenticates: advertise no AUTH at all.
                  auth_exclude_mechanism=("LOGIN", "PLAIN"), **kwargs)
        if not discovery.init_session(self, handler, kw):  # aiosmtpd's constructor, its tables made once
            super().__init__(handler, **kw)
        self._in_data = False
        self._data_t0 = 0.0
        self._data_bytes = 0
        self._errors = 0
        self._rejection: str | None = None
        self._slot = slot  # already admitted (implicit TLS: by the TlsGate, at TCP accept)
        self._idle = idle_timeout
        self._corked: list[bytes] | None = None  # the lines of a multi-line reply, written at once
        self._held: list[bytes] = []  # replies to a pipelined group, written with the group's last
        self._cut_start: _CutStart | None = None  # while DATA content is read, with cut-through possible

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._slot is None and self._rejection is None:  # not again after STARTTLS
            peer = transport.get_extra_info("peername")
            got = self.guard.slot(str(peer[0]) if peer else None)
            if isinstance(got, Slot):
                self._slot = got
            else:
                self._rejection = got
        super().connection_made(transport)
        if self._handler_coroutine is not None and self._original_transport is None:  # (not again after STARTTLS)
            # However the session task ends (QUIT, error, cancellation), the slot comes free.
            self._handler_coroutine.add_done_callback(self._session_over)
        # On an implicit-TLS listener the socket is TLS from the first byte; aiosmtpd only fills
        # session.ssl after STARTTLS, so record the TLS details the same way here.
        if self.session is not None and self.session.ssl is None:
            obj = transport.get_extra_info("ssl_object")
            if obj is not None:
                self.session.ssl = {"ssl_object": obj, "peercert": transport.get_extra_info("peercert"),
                                    "cipher": transport.get_extra_info("cipher")}

    def _release(self) -> None:
        if self._slot is not None:
            self._slot.release()

    def _session_over(self, task: asyncio.Task[None]) -> None:
        """The session task ended: its slot comes free, and the references that tie the session
        to itself are cut, so reference counting frees it (and whatever message it still holds)
        at once. Otherwise every session waited for the cyclic collector, which walked them all:
        about 30 µs a message, with gen1 passes of about 1.4 ms (issue #14). The cycles come from
        aiosmtpd's and asyncio's designs: the CancelledError the task keeps (QUIT and
        connection_lost end the session by cancelling its task), whose traceback holds the
        session's frames; the StreamWriter, whose protocol is the session; the bound methods of
        the command table; the client-connected callback. None of them is used once the task is
        over (``tests/protocol/test_session_lifetime.py``)."""
        self._release()
        if task.cancelled():
            # Taking the result hands over the kept CancelledError and clears it from the task
            # (asyncio.Future._make_cancelled_error); nothing else asks for it.
            with contextlib.suppress(asyncio.CancelledError):
                task.result()
        self._smtp_methods = {}
        self._writer = None  # type: ignore[assignment]
        self._client_connected_cb = None

    def connection_lost(self, error: Exception | None) -> None:
        self._release()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self._rejection is not None:
            await self.push(self._rejection)
            self._close()
            return
        if self.guard.greeting_delay:
            # Pregreet test: a legitimate client waits for the banner (RFC 5321 §3.1); one that
            # talks first is a spambot or a smuggling probe.
            await asyncio.sleep(self.guard.greeting_delay)
            if self._reader._buffer:  # type: ignore[attr-defined]
                log.warning("%r talked before the greeting", self.session.peer if self.session else None)
                await self.push("554 5.5.1 Protocol error: talking before the greeting")
                self._close()
                return
        await super()._handle_client()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: Any) -> None:
        line = status if isinstance(status, str) else status.decode("ascii", "replace")
        if self._in_data and line.startswith("500 Line too long"):
            # aiosmtpd answers an over-long DATA line with a permanent 500. Exchange Online may
            # already have accepted that message from its sender, so a 5xx would bounce it: we
            # answer 4xx (it stays queued at Exchange Online) and tell the operator which limit
            # to raise (README "Security": long lines).
            log.warning("%r DATA line over security.max_line_length (%d bytes): answered 451; raise the "
                        "limit if this is legitimate mail", self.session.peer if self.session else None,
                        self.guard.max_line_length)
            line = status = str(replies.DATA_LINE_TOO_LONG)
        if self._corked is not None:  # inside EHLO (smtp_EHLO): its 250 lines are held, anything else flushes them
            if line.startswith("250"):
                self._corked.append(self._encode(status) + b"\r\n")
                return
            await self._flush_corked()
        if line.startswith("250") and not self._in_data and b"\n" in self._reader._buffer:  # type: ignore[attr-defined]
            # RFC 2920 §3.2: the client pipelined (its next command is already here), so this
            # success waits for the group's last reply and they go out in one write: one send()
            # and, under TLS, one record, where aiosmtpd wrote one per reply (MAIL, each RCPT,
            # then DATA's 354, as Exchange Online groups them). Only 250s wait: any other reply
            # (354, an error, 221, 421) writes what is held first, so the order never changes;
            # nothing waits while the client waits for us (no complete command left unread).
            self._held.append(self._encode(status) + b"\r\n")
            return
        if self._held:
            await self._write_after_held([self._encode(status) + b"\r\n"])
        else:
            await super().push(status)
        if line[:1] in ("4", "5") and not line.startswith("421"):
            self._errors += 1
            if self._errors >= self.guard.max_errors:
                await super().push("421 4.7.0 Too many errors, closing connection")
                self._close()

    def _encode(self, status: str | bytes) -> bytes:
        """A reply as aiosmtpd's push() encodes it."""
        return status if isinstance(status, bytes) else status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")

    async def _write_after_held(self, lines: list[bytes]) -> None:
        """Write ``lines`` (encoded reply lines) in one write, after any replies held for a
        pipelined group, which were answered first."""
        held, self._held = self._held, []
        self._writer.write(b"".join(held + lines))
        await self._writer.drain()

    async def _flush_corked(self) -> None:
        if self._corked:
            corked, self._corked = self._corked, []
            await self._write_after_held(corked)  # replies held from before a pipelined EHLO go first

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        # aiosmtpd pushes each line of the EHLO reply as its own write: one send() and, under TLS,
        # one TLS record per line, twice per STARTTLS session. RFC 5321 §4.2.1 makes the
        # multi-line reply one reply: its 250 lines go out in one write (any other line, e.g. a
        # 501, first writes what was held, so the order never changes).
        self._corked = []
        try:
            await super().smtp_EHLO(hostname)
            await self._flush_corked()
        finally:
            self._corked = None

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        m = _SIMPLE_PATH.fullmatch(arg)
        if m is None:
            return SMTP._getaddr(self, arg)  # aiosmtpd's own parser
        addr = m.group(1)
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, m.group(2) or ""

    @syntax("DATA")  # what HELP shows, and what makes HELP list DATA at all
    async def smtp_DATA(self, arg: str) -> None:
        # The checks before 354 are aiosmtpd's (state, RCPT given, no argument); the content is
        # read by :meth:`_read_content`, buffer-wise instead of aiosmtpd's line-by-line loop.
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._in_data = True
        self._data_t0 = time.monotonic()
        self._data_bytes = 0
        try:
            content, problem, dotless, crlf = await self._read_content()
            if problem is not None:
                await self.push(problem)  # push() maps "500 Line too long" to our 451 while in DATA
        finally:
            self._in_data = False
        if problem is not None:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        # aiosmtpd annotates these as bytes; a big message is the reader's bytearray (see
        # _read_content), which the flow, ingress and stamper take as it is (bytes | bytearray).
        self.envelope.content = self.envelope.original_content = content  # type: ignore[assignment]
        if isinstance(self.envelope, RelayEnvelope):
            self.envelope.dotless, self.envelope.crlf = dotless, crlf
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_content(self) -> tuple[bytes | bytearray, str | None, bool, bool]:
        """The message content of one DATA, as aiosmtpd would produce it, at C speed.

        RFC 5321 §4.1.1.4 / §2.3.8: the content ends at the first line that is exactly "." — a
        line being what ends in CRLF, so only ``<CRLF>.<CRLF>`` ends it (a bare LF or CR before
        the dot does not: the smuggling variants of issue #10 stay inside the message, where
        ingress normalises them). The DATA line's own CRLF precedes the content, so the stream
        is searched as if it began with CRLF, which also finds an empty message (".\r\n").
        §4.5.2: a leading dot of any line is removed. Over-long lines (``line_length_limit``,
        CRLF included, as aiosmtpd counts) and content over ``data_size_limit`` (dot-stuffed
        bytes, as aiosmtpd counts) are read to the end and discarded, then refused.

        Pipelined commands after the final dot stay in the reader for the next command. The third
        value says no line of the content starts with a dot (found on the same pass); the fourth,
        that every CR and LF of it is half of a CRLF (checked as the octets arrived:
        :class:`relay.wire.CrlfCheck`; dot-unstuffing removes no CR or LF).
        """
        reader = self._reader
        limit = self.data_size_limit or 0
        # The content is found in the StreamReader's own buffer and copied out once: readuntil()
        # would copy it twice more (a bytearray slice, then bytes), and unstuffing once again,
        # four copies of a 25 MB message where one will do (issue #14). The DATA line's CRLF is
        # put back in front, so the content is searched as if it began with CRLF.
        buf: bytearray = reader._buffer  # type: ignore[attr-defined]
        buf[:0] = b"\r\n"
        # The reader pauses the socket when its buffer passes twice its limit (aiosmtpd's line
        # limit): raise it for the content, which is held whole anyway.
        saved = reader._limit  # type: ignore[attr-defined]
        reader._limit = max(saved, (limit or 2**31) + 5)  # type: ignore[attr-defined]
        # A big message may start going to the tenant while it arrives (relay/cutthrough.py).
        factory = getattr(self.event_handler, "cut_through", None)
        after = getattr(self.event_handler, "cut_through_after", 0)
        cut = self._cut_start = _CutStart(self, factory, after) if factory is not None and after else None
        check = wire.CrlfCheck()
        try:
            end, too_much = await _until_end_of_data(reader, buf, limit, cut, check)
        except (asyncio.CancelledError, asyncio.IncompleteReadError):
            # aiosmtpd cancels this coroutine on EOF or reset; either way the session is over.
            if cut is not None:
                cut.abort("the client went away")
            log.info("Connection lost during DATA")
            self._writer.close()
            raise asyncio.CancelledError from None
        finally:
            reader._limit = saved  # type: ignore[attr-defined]
            self._cut_start = None
        # buf[:end] is CRLF + dot-stuffed content + ".\r\n"; what follows is the next command.
        content: bytes | bytearray | None = None
        why = "over the size limit"  # no cut-through unless content is set below
        # buf[:end] = CRLF + content + ".CRLF": both cuts fall between CRLF pairs, so the
        # content holds a bare CR or LF exactly when buf[:end] does.
        crlf = check.proves(end)
        try:
            if too_much or (limit and end - 5 > limit):
                return b"", "552 Error: Too much mail data", False, False
            why = "the DATA reader stopped"
            # A big message is looked at in a worker thread so other sessions do not wait for two
            # passes over it; the loop only appends to buf meanwhile, after ``end``.
            too_long, stuffed = await offload.run_sized(end, wire.data_shape, buf, end, self.line_length_limit)
            if too_long:  # a line counts with its CRLF, as aiosmtpd counts
                why = "a line too long"
                return b"", "500 Line too long (see RFC5321 4.5.3.1.6)", False, False
            if not stuffed and end > offload.OFFLOAD_BYTES:
                # A big message is not copied out: the reader gets a new buffer with whatever
                # followed the final dot, and this one, trimmed in place (the DATA line's CRLF
                # off the front, ".CRLF" off the end), is the message, the one copy of it
                # that is held (issue #14: peak memory).
                reader._buffer = buf[end:]  # type: ignore[attr-defined]
                del buf[end - 3:]
                del buf[:2]
                end = 0  # nothing left to take out of the old buffer
                content = buf
                return buf, None, True, crlf
            with memoryview(buf) as view:
                if not stuffed:
                    content = bytes(view[2:end - 3])
                    return content, None, True, crlf
                raw = bytes(view[:end])
            why = "a line starting with a dot"  # as the cut-through's own check says it
            return await offload.run_sized(end, wire.unstuff, raw), None, False, crlf
        finally:
            if cut is not None:
                # Told before anything else runs: from here on offsets are the content's own.
                if content is not None:
                    cut.final(content, crlf)
                else:
                    cut.abort(why)
            if end:
                del buf[:end]
            reader._maybe_resume_transport()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self._in_data:
            self._reset_timeout()
            self._data_bytes += len(data)
            elapsed = time.monotonic() - self._data_t0
            # Slowloris: after a grace period the average rate must reach min_data_rate.
            if self.guard.min_data_rate and elapsed > min(30.0, self._idle) and \
                    self._data_bytes / elapsed < self.guard.min_data_rate:
                log.warning("%r DATA too slow: %d bytes in %.0f s", self.session.peer if self.session else None,
                            self._data_bytes, elapsed)
                if self.transport is not None:  # uvloop's transports are no asyncio.WriteTransport subclass
                    cast(asyncio.WriteTransport, self.transport).write(
                        b"421 4.4.2 Data rate too low, closing connection\r\n")
                self._close()
                return
        super().data_received(data)
        if self._cut_start is not None:
            self._cut_start.arrived(len(self._reader._buffer))  # type: ignore[attr-defined]

    # RFC 5321 §4.1.1.8: HELP says what the server takes. The relay never offers AUTH (Exchange
    # Online does not authenticate to a connector; EHLO does not advertise it), so HELP does not
    # list it either; a client that sends it anyway gets aiosmtpd's answer (538 before TLS, 504
    # after). STARTTLS is listed whenever it is offered, as aiosmtpd's own method is.
    _auth_offered = False

    @syntax("AUTH <mechanism>", when="_auth_offered")
    async def smtp_AUTH(self, arg: str) -> None:
        await super().smtp_AUTH(arg)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        # RFC 3207 §4.2: once TLS is active the client MUST NOT issue STARTTLS again; a second
        # handshake inside the first one was answered 220 by aiosmtpd and, abandoned, leaked
        # its session (issue #10).
        if self._tls_protocol is not None or (self.transport is not None
                                              and self.transport.get_extra_info("ssl_object") is not None):
            await self.push(str(replies.TLS_ALREADY_ACTIVE))
            return
        await super().smtp_STARTTLS(arg)

    def _timeout_cb(self) -> None:
        # A client that sends STARTTLS and then nothing (or never finishes the handshake) leaves
        # aiosmtpd's session task waiting forever: asyncio's SSLProtocol only reports
        # connection_lost to us once the handshake completed. Clean up ourselves.
        pending_tls = self._original_transport is not None and (self.session is None or self.session.ssl is None)
        super()._timeout_cb()  # type: ignore[no-untyped-call]
        if pending_tls:
            self.connection_lost(None)

    def hold_timeout(self, seconds: float) -> None:
        """Keep the connection for ``seconds`` while a handler works (see module doc)."""
        self._reset_timeout(seconds)


class Ehlo:
    """Handler mixin: what our EHLO advertises (relay and dev sink alike).

    * No AUTH: aiosmtpd advertises "250-AUTH" after STARTTLS even with no mechanisms enabled, and
      Exchange Online never authenticates to a smart host.
    * PIPELINING (RFC 2920), as Exchange Online's own inbound connector does: a client may send
      MAIL, its RCPTs and DATA as one group, which saves two round trips per message over the WAN.
      aiosmtpd reads one command line at a time from its buffer and answers in order, which is
      what RFC 2920 §3.2 asks of a server; what the client sent after STARTTLS in the same packet
      is still thrown away (RFC 3207 §4.2, tests/protocol/test_security.py), and the content is
      still read only after the 354, ending at the first CRLF.CRLF only.
    """

    async def handle_EHLO(
        self, _server: SMTP, session: Any, _envelope: Any, hostname: str, responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        out = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        return [*out[:-1], "250-PIPELINING", out[-1]]


class TlsGate(asyncio.Protocol):
    """Implicit TLS, admission first: the guard decides at TCP accept; a refused peer is closed
    before a single TLS byte is read or written (no 554 line: the port speaks TLS, so a refused
    client could not read one anyway), and an admitted one gets a handshake bounded by
    ``guard.tls_handshake_timeout``. Only then is the SMTP protocol attached to the TLS transport.

    asyncio's ``create_server(ssl=...)`` would instead run the handshake (~330 KB each) before
    any protocol code sees the connection, for allowed and refused peers alike (issue #10)."""

    def __init__(self, factory: Callable[[Slot], SMTP], guard: Guard, tls_context: ssl.SSLContext) -> None:
        self.factory, self.guard, self.tls_context = factory, guard, tls_context
        self.slot: Slot | None = None
        self.task: asyncio.Task[None] | None = None
        self.early: list[bytes] = []  # bytes that arrive between handshake and hand-over

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance(transport, asyncio.Transport): uvloop's TCP transport is no subclass of it
        # (uvloop itself does not serve this gate: relay.eventloop).
        transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        got = self.guard.slot(str(peer[0]) if peer else None)
        if not isinstance(got, Slot):
            log.info("closed connection from %s before TLS: %s", peer[0] if peer else None, got)
            transport.abort()
            return
        self.slot = got
        self.task = asyncio.get_running_loop().create_task(self._handshake(transport))

    async def _handshake(self, transport: asyncio.Transport) -> None:
        assert self.slot is not None
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(transport, self, self.tls_context, server_side=True,
                                       ssl_handshake_timeout=self.guard.tls_handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            log.info("TLS handshake with %s failed: %s", transport.get_extra_info("peername"), e)
            transport.abort()
            self.slot.release()
            return
        if tls is None:  # the peer went away during the handshake
            self.slot.release()
            return
        smtp = self.factory(self.slot)
        tls.set_protocol(smtp)
        smtp.connection_made(tls)
        for chunk in self.early:
            smtp.data_received(chunk)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        self.early.append(data)

    def connection_lost(self, _exc: Exception | None) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.slot is not None:
            self.slot.release()


# The accept queue: asyncio's default is 100. When it overflows, Linux (tcp_abort_on_overflow=0)
# drops the handshake's last ACK, so the client believes it is connected and waits for a greeting
# that never comes, until its own timeout (Exchange Online opens connections in bursts; the
# benchmark's open loop left Postfix, backlog 200, with hundreds of such connections). The kernel
# caps it at net.core.somaxconn (4096 by default since Linux 5.4).
LISTEN_BACKLOG = 1024


async def start_listener(
    factory: Callable[..., SMTP], listener: Listener, tls_context: ssl.SSLContext | None, guard: Guard,
    *, sock: socket.socket | None = None,
) -> asyncio.Server:
    """Bind one listener. STARTTLS listeners get plain TCP (admission happens in the SMTP
    protocol's ``connection_made``, at accept); implicit-TLS ones go through a :class:`TlsGate`.
    ``sock``: serve this already listening socket instead (a worker's share of its supervisor's,
    :func:`bind_sockets`)."""
    loop = asyncio.get_running_loop()
    where: dict[str, Any] = {"sock": sock} if sock is not None else {
        "host": listener.host, "port": listener.port, "reuse_address": True}
    if listener.implicit_tls:
        if tls_context is None:
            raise ValueError("an implicit-TLS listener needs a TLS context")
        ctx = tls_context
        return await loop.create_server(lambda: TlsGate(lambda slot: factory(slot=slot), guard, ctx),
                                        backlog=LISTEN_BACKLOG, **where)
    return await loop.create_server(factory, backlog=LISTEN_BACKLOG, **where)


def bind_sockets(listeners: Sequence[Listener]) -> list[list[int]]:
    """Listening sockets for ``listeners``, bound as :func:`start_listener` binds (asyncio's rules:
    every address the host resolves to, IPv6 ones v6-only), as inheritable file descriptors: per
    listener, one per address. A supervisor binds them once and its workers serve them
    (``start_listener(sock=...)``)."""
    async def bind() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        out: list[list[int]] = []
        for lst in listeners:
            server = await loop.create_server(asyncio.Protocol, host=lst.host, port=lst.port, reuse_address=True,
                                              backlog=LISTEN_BACKLOG, start_serving=False)
            fds = [os.dup(s.fileno()) for s in server.sockets]
            server.close()
            for fd in fds:
                sk = socket.socket(fileno=fd)
                sk.listen(LISTEN_BACKLOG)  # the kernel queues connections even while no worker is up
                sk.detach()
                os.set_inheritable(fd, True)
            out.append(fds)
        return out

    return asyncio.run(bind())
