"""Cut-through delivery of big messages (relay/cutthrough.py), against an endpoint that records
every octet it reads, connection by connection: the message goes out while it arrives, the dot
only when it is exactly what store and forward sends, and nothing store and forward would not
send ever reaches the wire (bare CR/LF, a line starting with a dot, 8-bit after a 7-bit MAIL),
whatever the client does."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay import binding, pipeline, replies
from relay.config import Config
from relay.errors import TransientError
from relay.flow import bind_and_plan
from tests.protocol.conftest import Stack, journal
from tests.protocol.rawsmtp import Raw
from tests.support import Deployment, make_deployment

AFTER = 64 * 1024
FAST = 1024 * 1024  # cut_through_after for a client faster than the relay: several of its reads
LINE = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"


class Wire:
    """A tenant endpoint (PIPELINING, 8BITMIME, SMTPUTF8) that keeps every octet it reads and
    takes a message only at CRLF.CRLF, as any RFC 5321 server does."""

    def __init__(self) -> None:
        self.conns: list[bytearray] = []
        self.messages: list[bytes] = []
        self.data_started = asyncio.Event()
        self.content_seen = 0  # content octets read so far in the current DATA
        self.final_reply = b"250 2.0.0 Ok: queued\r\n"
        self.closed = 0  # connections that ended (closed by the relay, or after QUIT)
        self.stall = False  # stop reading once DATA is answered (an endpoint that hangs)
        self.unstall = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=2**27)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        rec = bytearray()
        self.conns.append(rec)
        w.write(b"220 wire ESMTP\r\n")
        try:
            while True:
                line = await r.readline()
                if not line:
                    return
                rec += line
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    w.write(b"250-wire\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 200000000\r\n")
                elif verb == b"DATA":
                    w.write(b"354 go ahead\r\n")
                    await w.drain()
                    self.data_started.set()
                    await self._content(r, rec)
                    w.write(self.final_reply)
                elif verb == b"QUIT":
                    w.write(b"221 bye\r\n")
                    await w.drain()
                    return
                else:
                    w.write(b"250 ok\r\n")
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.closed += 1
            w.close()

    async def _content(self, r: asyncio.StreamReader, rec: bytearray) -> None:
        if self.stall:  # the socket, not only this reader: asyncio would go on buffering for it
            transport = r._transport  # type: ignore[attr-defined]
            transport.pause_reading()
            await self.unstall.wait()  # then read what was sent, to its end
            transport.resume_reading()
        got = bytearray(b"\r\n")  # the DATA line's CRLF: an empty first line still ends it
        self.content_seen = 0
        while True:
            chunk = await r.read(65536)
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(got), None)
            rec += chunk
            got += chunk
            self.content_seen += len(chunk)
            end = got.find(b"\r\n.\r\n", max(0, len(got) - len(chunk) - 4))
            if end >= 0:
                self.messages.append(bytes(got[2:end + 2]).replace(b"\r\n..", b"\r\n."))
                return


# A client that sends one message in plain text as fast as the kernel takes it (run as a process of its own).
_CLIENT = r"""
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30) as sk, sk.makefile("rb") as f:
    def reply():
        while (line := f.readline().decode())[3:4] == "-":
            pass
        return line
    assert reply().startswith("220")
    for cmd in (b"EHLO mail.contoso.com", b"MAIL FROM:<alice@contoso.com>", b"RCPT TO:<bob@example.net>", b"DATA"):
        sk.sendall(cmd + b"\r\n")
        assert reply()[:1] in "23", cmd
    sk.sendall(open(sys.argv[2], "rb").read())
    print(reply(), end="")
"""


def attachment_message(kb: int, *, html: bytes = b"<html><body><p>See the file.</p></body></html>",
                       tail: bytes = b"", close: bool = True) -> bytes:
    """multipart/mixed: an HTML part, then an attachment of about ``kb`` KiB of base64 lines; ``tail``
    goes in the attachment's body two thirds of the way in (well past the cut-through's first bytes)."""
    lines = LINE * (kb * 1024 // len(LINE))
    at = (len(lines) * 2 // 3) // len(LINE) * len(LINE)
    body = lines[:at] + tail + lines[at:]
    return (b"From: Alice <alice@contoso.com>\r\nTo: <bob@example.net>\r\nSubject: the file\r\n"
            b"Message-ID: <cut.1@contoso.com>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"m\"\r\n\r\n--m\r\n"
            b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html + b"\r\n"
            b"--m\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=\"a.bin\"\r\n\r\n" + body + (b"--m--\r\n" if close else b""))


def stuffed(raw: bytes) -> bytes:
    return (b"." if raw.startswith(b".") else b"") + raw.replace(b"\r\n.", b"\r\n..")


def store_and_forward(cfg: Config, raw: bytes, delivered: bytes) -> bytes:
    """What the one flow makes of ``raw`` with the trace field the delivered copy carries: the
    copy store and forward sends (relay/flow.py's steps, called directly)."""
    end = 0
    while True:  # our Received: field, folded lines included (RFC 5322 §2.2.3)
        end = delivered.index(b"\r\n", end) + 2
        if delivered[end:end + 1] not in (b" ", b"\t"):
            break
    received = delivered[:end]
    inbound = pipeline.accept(raw, pipeline.Settings.of(cfg))
    prepared = bind_and_plan(cfg, inbound, "alice@contoso.com", ["bob@example.net"],
                             binding.Peer(ip="127.0.0.1", cert_names=(), sni=None), dt.datetime.now(dt.UTC),
                             lambda _group: received)
    assert len(prepared.copies) == 1
    return prepared.copies[0].processed.data


def no_bare_cr_or_lf(stream: bytes | bytearray) -> bool:
    rest = bytes(stream).replace(b"\r\n", b"")
    return b"\r" not in rest and b"\n" not in rest


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    w = Wire()
    yield w
    w.unstall.set()
    await w.stop()


async def start_cut_stack(tmp_path: Path, pki_dir: Path, wire: Wire, make_stack: object, *, after: int = AFTER,
                          data_timeout: str = "20", delivery: str = "", listen: str = "") -> Stack:
    """The relay delivering to ``wire`` in the plaintext loopback profile, cut-through after
    ``after`` octets; ``delivery`` and ``listen``: more lines for those tables."""
    port = await wire.start()
    dep: Deployment = make_deployment(tmp_path / "cut", pki_from=pki_dir, contoso_endpoint=f"127.0.0.1:{port}",
                                      signature=True)
    text = dep.config_path.read_text().replace(
        "data_timeout = 20\n",
        f"data_timeout = {data_timeout}\nplaintext_loopback_benchmark = true\ncut_through_after = {after}\n{delivery}")
    dep.config_path.write_text(text.replace("idle_timeout = 30\n", f"idle_timeout = 30\n{listen}"))
    st = await make_stack(cfg=dep.load())  # type: ignore[operator]
    assert isinstance(st, Stack)
    st.deployment = dep
    return st


@pytest.fixture
async def cut_stack(tmp_path: Path, pki_dir: Path, wire: Wire, make_stack: object) -> Stack:
    return await start_cut_stack(tmp_path, pki_dir, wire, make_stack)


async def at_data(st: Stack) -> Raw:
    """A client session over STARTTLS, as Exchange Online's, that was just answered 354."""
    c = await Raw.open(st.deployment.relay_port)
    assert (await c.reply()).startswith("220")
    assert (await c.cmd(b"EHLO mail.contoso.com")).startswith("250")
    assert (await c.cmd(b"STARTTLS")).startswith("220")
    await c.starttls(st.client_tls())
    for cmd, code in ((b"EHLO mail.contoso.com", "250"), (b"MAIL FROM:<alice@contoso.com>", "250"),
                      (b"RCPT TO:<bob@example.net>", "250"), (b"DATA", "354")):
        reply = await c.cmd(cmd)
        assert reply.startswith(code), (cmd, reply)
    return c


async def all_closed(wire: Wire) -> bool:
    """Whether every connection to the endpoint has ended (waiting a little for the relay)."""
    for _ in range(300):
        if wire.closed == len(wire.conns):
            return True
        await asyncio.sleep(0.01)
    return False


async def send(st: Stack, raw: bytes) -> str:
    """``raw`` in two halves a moment apart, as a client on a network sends it: on loopback the
    relay could otherwise read all of it at once (uvloop reads up to 32 times per wake-up), find
    the end at once, and have nothing to cut through."""
    c = await at_data(st)
    data = stuffed(raw) + b".\r\n"
    await c.send(data[:len(data) // 3])
    await asyncio.sleep(0.1)
    await c.send(data[len(data) // 3:])
    reply = await c.reply(wait=30)
    c.writer.close()
    return reply


@pytest.fixture
def relay_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="relay")
    return caplog


async def test_a_big_message_goes_out_while_it_arrives_and_is_what_store_and_forward_sends(
        cut_stack: Stack, wire: Wire, relay_log: pytest.LogCaptureFixture) -> None:
    raw = attachment_message(1024)
    c = await at_data(cut_stack)
    half = len(raw) // 2
    await c.send(raw[:half])
    # The endpoint is reading the message before the client has sent the rest of it.
    await asyncio.wait_for(wire.data_started.wait(), 10)
    for _ in range(200):
        if wire.content_seen > AFTER:
            break
        await asyncio.sleep(0.01)
    assert wire.content_seen > AFTER
    assert not wire.messages
    await c.send(raw[half:] + b".\r\n")
    reply = await c.reply(wait=30)
    c.writer.close()
    assert reply.startswith("250 "), reply
    assert len(wire.messages) == 1
    delivered = wire.messages[0]
    assert delivered == store_and_forward(cut_stack.cfg, raw, delivered)
    assert b"Alice Wilber" in delivered  # stamped
    assert "cut_through=delivered" in relay_log.text
    assert not cut_stack.delivery.outcomes  # the store-and-forward path never ran
    mail = next(line for line in bytes(wire.conns[0]).split(b"\r\n") if line.startswith(b"MAIL"))
    assert b"SIZE=" not in mail  # not known while the message arrives (RFC 1870: optional)
    assert all(no_bare_cr_or_lf(cn) for cn in wire.conns)


async def fast_client(tmp_path: Path, pki_dir: Path, wire: Wire, make_stack: object, raw: bytes,
                      extra: str = "") -> tuple[str, Stack]:
    """The relay in plain text (the benchmark profile: TLS hands the content over a record at a
    time) with cut-through after ``FAST`` octets, and a client that writes ``raw`` as fast as the
    kernel takes it, in a process of its own with a blocking socket: the kernel keeps the relay's
    socket full while the event loop works (a client on the test's loop, or a thread sharing its
    GIL, could only write when the loop let it). The relay's reply to the final dot, and the stack."""
    st = await start_cut_stack(tmp_path, pki_dir, wire, make_stack, after=FAST,
                               listen=f"require_starttls = false\n{extra}")
    msg = tmp_path / "m.eml"
    msg.write_bytes(stuffed(raw) + b".\r\n")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _CLIENT, str(st.deployment.relay_port), str(msg),
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode(), st


async def test_a_client_faster_than_the_relay_is_cut_through_from_its_first_octets(
        tmp_path: Path, pki_dir: Path, wire: Wire, make_stack: object, relay_log: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that writes the whole message at once: the event loop would read on (uvloop reads
    up to 32 times per wake-up) and the DATA reader would first see megabytes (8 MB here without
    the pause, on uvloop), or the whole message and nothing to cut through. Reading pauses once
    the first ``cut_through_after`` octets are in, so the cut-through is asked for there, and
    delivers."""
    import relay.smtp.server

    asked: list[int] = []
    real = relay.smtp.server._CutStart.progress

    def spy(self: relay.smtp.server._CutStart, buf: bytearray, offset: int, crlf: object) -> None:
        if self.cut is None and offset - 2 >= self.after:
            asked.append(offset - 2)  # content octets in when the cut-through is asked for
        real(self, buf, offset, crlf)  # type: ignore[arg-type]

    monkeypatch.setattr(relay.smtp.server._CutStart, "progress", spy)
    raw = attachment_message(16 * 1024)
    reply, st = await fast_client(tmp_path, pki_dir, wire, make_stack, raw)
    assert reply.startswith("250 "), reply
    assert asked and asked[0] < FAST + 1024 * 1024, asked  # not megabytes later
    assert "cut_through=delivered" in relay_log.text
    assert len(wire.messages) == 1
    delivered = wire.messages[0]
    assert delivered == store_and_forward(st.cfg, raw, delivered)
    assert all(no_bare_cr_or_lf(cn) for cn in wire.conns)


async def test_a_fast_client_over_the_size_limit_before_the_cut_through_was_asked_for_is_refused(
        tmp_path: Path, pki_dir: Path, wire: Wire, make_stack: object) -> None:
    """The size limit below ``cut_through_after``: the reader drops what is over the limit and
    reads on to the final dot, and the pause for the cut-through must not stop it (a hang). The
    limit is over half of ``FAST``: the StreamReader's own flow control pauses at twice its limit
    and resumes by itself, which would hide a pause nobody ends."""
    reply, _ = await fast_client(tmp_path, pki_dir, wire, make_stack, attachment_message(16 * 1024),
                                 "max_message_size = 700000\n")
    assert reply.startswith("552"), reply
    assert not wire.messages and not wire.conns


@pytest.mark.parametrize("tail, why", [
    (b"smuggled\n.\r\nMAIL FROM:<ceo@bank.example>\r\n", "bare CR or LF"),
    (b"line\rwith a bare CR\r\n", "bare CR or LF"),
    (b".a line starting with a dot\r\n", "a line starting with a dot"),
    ("8-bit: grüße\r\n".encode(), "8-bit data after a 7-bit MAIL"),
])
async def test_what_store_and_forward_would_not_send_never_reaches_the_wire(
        cut_stack: Stack, wire: Wire, relay_log: pytest.LogCaptureFixture, tail: bytes, why: str) -> None:
    raw = attachment_message(768, tail=tail)
    reply = await send(cut_stack, raw)
    assert reply.startswith("250 "), reply
    # The cut-through stopped before the chunk holding it; the message went out once, by store
    # and forward, in its normalised form (every octet of every connection CRLF-clean).
    assert f"cut_through=\"off: {why}\"" in relay_log.text
    assert len(wire.messages) == 1
    delivered = wire.messages[0]
    assert delivered == store_and_forward(cut_stack.cfg, raw, delivered)
    assert all(no_bare_cr_or_lf(cn) for cn in wire.conns)
    aborted = [cn for cn in wire.conns if b"\r\n.\r\n" not in cn]
    assert len(aborted) == 1 and b"DATA\r\n" in aborted[0]  # the cut-through's, ended without the dot
    assert tail.split(b"\n")[0].rstrip(b"\r") not in aborted[0]  # stopped before that chunk was written


async def test_a_tail_that_breaks_the_mime_gets_the_untouched_copy_not_the_stamped_head(
        cut_stack: Stack, wire: Wire, relay_log: pytest.LogCaptureFixture) -> None:
    raw = attachment_message(512, close=False)  # no close delimiter: malformed, relayed untouched
    reply = await send(cut_stack, raw)
    assert reply.startswith("250 "), reply
    assert 'cut_through="off: the message is not what was sent"' in relay_log.text
    assert len(wire.messages) == 1
    delivered = wire.messages[0]
    assert delivered == store_and_forward(cut_stack.cfg, raw, delivered)
    assert b"Alice Wilber" not in delivered
    assert sum(b"\r\n.\r\n" in cn for cn in wire.conns) == 1  # the stamped head never got its dot


async def test_a_client_that_goes_away_mid_data_delivers_nothing(cut_stack: Stack, wire: Wire) -> None:
    raw = attachment_message(1024)
    c = await at_data(cut_stack)
    await c.send(raw[:len(raw) // 2])
    await asyncio.wait_for(wire.data_started.wait(), 10)
    for _ in range(200):
        if wire.content_seen > AFTER:
            break
        await asyncio.sleep(0.01)
    assert wire.content_seen > AFTER  # the endpoint had part of it
    c.writer.transport.abort()
    for _ in range(500):  # the relay closes the endpoint connection, without the dot
        if wire.closed == len(wire.conns):
            break
        await asyncio.sleep(0.01)
    assert wire.closed == len(wire.conns) == 1
    assert not wire.messages
    assert all(b"\r\n.\r\n" not in cn for cn in wire.conns)


async def test_over_the_size_limit_is_refused_and_nothing_is_delivered(
        tmp_path: Path, pki_dir: Path, wire: Wire, make_stack: object) -> None:
    st = await start_cut_stack(tmp_path, pki_dir, wire, make_stack, listen="max_message_size = 400000\n")
    reply = await send(st, attachment_message(1024))
    assert reply.startswith("552"), reply
    assert not wire.messages
    assert wire.conns and all(b"\r\n.\r\n" not in cn for cn in wire.conns)  # it had started, and got no dot
    assert await all_closed(wire)  # not left open


async def test_a_line_too_long_after_the_cut_is_refused_and_nothing_is_delivered(
        cut_stack: Stack, wire: Wire) -> None:
    long_line = b"A" * (cut_stack.cfg.security.max_line_length + 10) + b"\r\n"
    reply = await send(cut_stack, attachment_message(512, tail=long_line))
    assert reply[:1] in ("4", "5"), reply
    assert not wire.messages
    assert wire.conns and all(b"\r\n.\r\n" not in cn for cn in wire.conns)
    assert await all_closed(wire)


async def test_a_failure_once_the_message_is_in_closes_the_cut_through_without_the_dot(
        cut_stack: Stack, wire: Wire, monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.flow

    real = relay.flow.bind_and_plan

    def failing(cfg: Config, inbound: object, *a: object) -> object:
        if len(inbound.raw) > 4 * AFTER:  # type: ignore[attr-defined]  # the whole message, not the speculation's
            raise TransientError(replies.QUEUE_WRITE_FAILED, "injected")
        return real(cfg, inbound, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(relay.flow, "bind_and_plan", failing)
    reply = await send(cut_stack, attachment_message(768))
    assert reply.startswith("451"), reply
    assert not wire.messages
    assert wire.conns and all(b"\r\n.\r\n" not in cn for cn in wire.conns)
    assert await all_closed(wire)


async def test_the_endpoints_answer_to_the_dot_is_the_clients(cut_stack: Stack, wire: Wire,
                                                              relay_log: pytest.LogCaptureFixture) -> None:
    wire.final_reply = b"452 4.3.1 Insufficient system storage\r\n"
    reply = await send(cut_stack, attachment_message(512))
    assert reply.startswith("452"), reply  # a 4xx: Exchange Online keeps the message and retries
    assert len(wire.messages) == 1 and len(wire.conns) == 1  # one attempt, not a second by store and forward
    assert 'cut_through="the endpoint answered the dot 452"' in relay_log.text  # the dot was the cut-through's
    metrics = cut_stack.relay.metrics.render().decode()
    assert 'signature_relay_delivery_errors_total{reason="other",tenant="contoso"} 1.0' in metrics


async def test_queue_mode_opens_no_transaction_it_would_only_abandon(
        tmp_path: Path, pki_dir: Path, wire: Wire, make_stack: object, relay_log: pytest.LogCaptureFixture) -> None:
    st = await start_cut_stack(tmp_path, pki_dir, wire, make_stack,
                               delivery=f"mode = \"queue\"\nspool_dir = \"{tmp_path / 'spool'}\"\nretry_min = 0.2\n")
    raw = attachment_message(512)
    reply = await send(st, raw)
    assert reply.startswith("250") and "queued" in reply, reply
    assert 'cut_through="off: queue mode"' in relay_log.text
    for _ in range(500):  # the queue runner delivers it, by store and forward
        if wire.messages:
            break
        await asyncio.sleep(0.01)
    assert len(wire.messages) == 1
    assert all(b"\r\n.\r\n" in cn for cn in wire.conns)  # no transaction opened and abandoned


async def test_an_endpoint_that_stops_reading_gets_no_dot_and_the_client_a_4xx(
        tmp_path: Path, pki_dir: Path, wire: Wire, make_stack: object) -> None:
    st = await start_cut_stack(tmp_path, pki_dir, wire, make_stack, data_timeout="1.5")
    wire.stall = True
    t0 = asyncio.get_running_loop().time()
    reply = await send(st, attachment_message(24 * 1024))  # more than the socket buffers hold
    assert reply.startswith("451 4.4.2"), reply  # the endpoint timed out: Exchange Online retries
    # One wait for the endpoint, not one for the cut-through and another for store and forward.
    assert asyncio.get_running_loop().time() - t0 < 2 * 1.5 + 2
    metrics = st.relay.metrics.render().decode()
    assert 'signature_relay_delivery_errors_total{reason="timeout",tenant="contoso"} 1.0' in metrics
    wire.unstall.set()  # the endpoint reads again: what was written, then the closed connection
    assert len(wire.conns) == 1 and await all_closed(wire)
    assert not wire.messages  # no dot in any of it


async def test_the_message_is_let_go_of_without_waiting_for_the_cycle_collector(
        cut_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 25 MB message kept alive by a reference cycle stays in memory until the collector runs,
    # which is rare once the heap is frozen: 3 messages later the relay held 80 MB more.
    import gc
    import weakref

    import relay.flow

    made: list[weakref.ref[object]] = []
    real = relay.flow.MessageFlow.cut_through

    def recording(self: relay.flow.MessageFlow, *a: object) -> object:
        cut = real(self, *a)  # type: ignore[arg-type]
        made.append(weakref.ref(cut))
        return cut

    monkeypatch.setattr(relay.flow.MessageFlow, "cut_through", recording)
    gc.collect()
    gc.disable()
    try:
        reply = await send(cut_stack, attachment_message(512))
        assert reply.startswith("250 "), reply
        for _ in range(100):
            if made and made[0]() is None:
                break
            await asyncio.sleep(0.01)
        assert len(made) == 1 and made[0]() is None
    finally:
        gc.enable()


async def test_cut_through_over_starttls_with_the_tenants_certificate_into_the_dev_sink(
        stack: Stack, relay_log: pytest.LogCaptureFixture) -> None:
    # The production path: STARTTLS to the endpoint, verified, with the tenant's client
    # certificate (the dev sink checks it), the default cut_through_after.
    raw = attachment_message(1024)
    c = await at_data(stack)
    await c.send(raw[:len(raw) // 2])  # the rest a moment later, as a client on a network sends it
    await asyncio.sleep(0.2)
    await c.send(raw[len(raw) // 2:] + b".\r\n")
    assert (await c.reply(wait=30)).startswith("250 ")
    c.close()
    assert "cut_through=delivered" in relay_log.text
    [stored] = stack.deployment.delivered()
    assert stored == store_and_forward(stack.cfg, raw, stored)
    [record] = journal(stack.deployment)
    assert record["tenant"] == "contoso" and record["client_cert"] and record["tls"]


async def test_many_at_once_with_clients_that_misbehave_deliver_exactly_what_got_250(
        cut_stack: Stack, wire: Wire, relay_log: pytest.LogCaptureFixture) -> None:
    # Sessions at once, each message with or without a trap after the cut (bare LF, dot line,
    # 8-bit) and some clients that go away mid-DATA: the endpoint gets exactly one message per
    # 250, each the one flow's copy, and never a bare CR or LF on any connection.
    import random

    rnd = random.Random(14)
    traps = [b"", b"", b"", b"x\ny\r\n", b".dot\r\n", "ü\r\n".encode()]

    async def one(i: int) -> tuple[bytes, str]:
        raw = attachment_message(rnd.choice([300, 700, 1500]), tail=rnd.choice(traps)).replace(
            b"<cut.1@", b"<cut.%d@" % i)
        c = await at_data(cut_stack)
        data = stuffed(raw) + b".\r\n"
        cut = rnd.randrange(len(data) // 4, len(data) - 10)
        await c.send(data[:cut])
        await asyncio.sleep(rnd.random() * 0.05)
        if i % 5 == 4:  # this client goes away
            c.writer.transport.abort()
            return raw, "gone"
        await c.send(data[cut:])
        reply = await c.reply(wait=60)
        c.close()
        return raw, reply

    results = await asyncio.gather(*(one(i) for i in range(15)))
    accepted = {raw: r for raw, r in results if r.startswith("250 ")}
    assert len(accepted) == sum(1 for _, r in results if r != "gone")  # everyone who stayed got a 250
    assert len(wire.messages) == len(accepted)
    by_id = {re.search(rb"Message-ID: <(cut\.\d+)@", m).group(1): m for m in wire.messages}  # type: ignore[union-attr]
    for raw in accepted:
        mid = re.search(rb"Message-ID: <(cut\.\d+)@", raw).group(1)  # type: ignore[union-attr]
        delivered = by_id[mid]
        assert delivered == store_and_forward(cut_stack.cfg, raw, delivered)
    assert all(no_bare_cr_or_lf(cn) for cn in wire.conns)
    assert "Traceback" not in relay_log.text and "BufferError" not in relay_log.text
    assert "cut_through=delivered" in relay_log.text
