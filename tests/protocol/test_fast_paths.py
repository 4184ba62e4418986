"""The fast DATA paths of issue #14 against real peers: what the endpoint receives is exactly what
aiosmtplib's own DATA path would have sent, and the benchmark profile's plaintext delivery is
confined to loopback endpoints."""

from __future__ import annotations

import re
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller

from relay.delivery.client import send_data
from relay.mime import headers
from relay.wire import crlf_only
from tests.protocol.test_relay_protocol import _NoTlsEndpoint, send
from tests.support import Deployment, free_port, message


class _Recorder:
    def __init__(self) -> None:
        self.got: list[bytes] = []

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        self.got.append(envelope.original_content)
        return "250 OK"


BODIES = [
    b"Subject: x\r\n\r\n.leading dot on the first body line\r\n..two\r\n.\r\nend\r\n",
    b".From a dot\r\n\r\nbody\r\n",
    b"Subject: y\r\n\r\nno dots at all\r\n",
    b"Subject: bare\n\nbare LF and a bare CR\r here\r\n.dot after\n",  # not CRLF-clean: aiosmtplib's path
    b"Subject: z\r\n\r\nno final line break",
    # Over relay.wire.CHUNK: written in pieces under flow control, dots near every kind of cut.
    b"Subject: big\r\n\r\n" + b"".join((b"." if i % 7 == 0 else b"") + b"x" * (i % 90) + b"\r\n"
                                        for i in range(40_000)),
    # Over CHUNK with no line starting with a dot: cut into views anywhere, never searched.
    b"Subject: big, dotless\r\n\r\n" + b"".join(b"x." * (i % 45) + b"\r\n" for i in range(40_000)),
]


@pytest.mark.parametrize("body", BODIES)
async def test_send_data_delivers_what_aiosmtplib_would(body: bytes) -> None:
    rec = _Recorder()
    ctl = Controller(rec, hostname="127.0.0.1", port=free_port())
    ctl.start()
    try:
        for sender in ("ours", "aiosmtplib"):
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=ctl.port, start_tls=False) as c:
                await c.mail("a@contoso.com")
                await c.rcpt("b@example.net")
                if sender == "ours":
                    # as when the stamper proved CRLF-only and, where so, no line starting with a dot
                    dotless = crlf_only(body) and not body.startswith(b".") and b"\r\n." not in body
                    r = await send_data(c, body, 10, crlf=crlf_only(body), dotless=dotless)
                else:
                    r = await c.data(body)
                assert r.code == 250
        ours, theirs = rec.got
        assert ours == theirs
    finally:
        ctl.stop()


async def test_a_refused_data_is_an_smtp_data_error() -> None:
    class Refuse:
        async def handle_DATA(self, *_a: Any) -> str:
            return "554 5.6.0 no"

    ctl = Controller(Refuse(), hostname="127.0.0.1", port=free_port())
    ctl.start()
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=ctl.port, start_tls=False) as c:
            await c.mail("a@contoso.com")
            await c.rcpt("b@example.net")
            with pytest.raises(aiosmtplib.SMTPDataError) as e:
                await send_data(c, b"Subject: x\r\n\r\nhi\r\n", 10)
            assert e.value.code == 554
            assert (await c.noop()).code == 250  # the session is still in step
    finally:
        ctl.stop()


async def test_benchmark_profile_sends_plaintext_to_loopback_only(make_stack: Any, deployment: Deployment) -> None:
    """``[delivery] plaintext_loopback_benchmark`` (the e2e benchmark's like-with-like profile)
    delivers without STARTTLS to a loopback endpoint; a named endpoint still needs STARTTLS."""
    port = free_port()
    ctl = Controller(_NoTlsEndpoint(), hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        cfg = deployment.config_path
        cfg.write_text(cfg.read_text().replace("[delivery]\n", "[delivery]\nplaintext_loopback_benchmark = true\n"))
        tenant = deployment.root / "rules" / "contoso" / "tenant.toml"
        tenant.write_text(re.sub(r'endpoint = ".*"', f'endpoint = "127.0.0.1:{port}"', tenant.read_text()))
        st = await make_stack(with_sink=False)
        code, _ = await send(st, message())
        assert code == 250
        # the same endpoint by name ("localhost" resolves to loopback, but a name is never trusted)
        from relay.delivery.client import _is_loopback

        assert _is_loopback("127.0.0.1") and _is_loopback("::1") and not _is_loopback("localhost")
    finally:
        ctl.stop()


async def test_a_big_message_goes_from_the_readers_buffer_to_the_endpoint_in_pieces(
        make_stack: Any, deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #14, peak memory: over OFFLOAD_BYTES the DATA reader hands its own buffer on (no copy),
    the stamper leaves each copy as views of it plus its insertions, and delivery writes those.
    Two copies (external and internal signatures) share the one buffer; what each endpoint
    transaction receives is the message with its signature, the attachment octet for octet."""
    import base64

    from relay import offload, pipeline, wire
    from tests.protocol.test_relay_protocol import external_internal_rules

    external_internal_rules(deployment)
    st = await make_stack()
    blob = base64.encodebytes(bytes(range(256)) * 4000).replace(b"\n", b"\r\n")  # 1.4 MB, lines of 76
    attachment = (b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
                  b"Content-Disposition: attachment; filename=\"x.bin\"\r\n\r\n" + blob)
    raw = message(to="a@example.net").replace(
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Type: multipart/mixed; boundary=\"b\"\r\n") + b"--b\r\nContent-Type: text/html\r\n\r\n" \
        b"<p>Hello Bob,</p><p>the file.</p>\r\n" + attachment + b"--b--\r\n"
    # message() put its text body after the header: that is the preamble here, left as it is
    assert len(raw) > offload.OFFLOAD_BYTES and b"\r\n." not in raw

    seen: dict[str, list[type]] = {"accept": [], "delivery": []}
    accept, stuffed = pipeline.accept, wire.stuffed_pieces

    def spy_accept(raw: Any, *a: Any, **k: Any) -> Any:
        seen["accept"].append(type(raw))
        return accept(raw, *a, **k)

    def spy_stuffed(data: Any, *a: Any, **k: Any) -> Any:
        seen["delivery"].append(type(data))
        return stuffed(data, *a, **k)

    monkeypatch.setattr(pipeline, "accept", spy_accept)
    monkeypatch.setattr(wire, "stuffed_pieces", spy_stuffed)
    code, _ = await send(st, raw, rcpts=("a@example.net", "bob@contoso.com"))
    assert code == 250
    assert seen == {"accept": [bytearray], "delivery": [tuple, tuple]}
    got = st.deployment.delivered()
    assert len(got) == 2
    for sig in (b"EXTERNAL SIGNATURE", b"INTERNAL SIGNATURE"):
        [copy] = [g for g in got if sig in g]
        assert copy.endswith(attachment + b"--b--\r\n")  # after the edited leaf, every octet as sent
        assert headers.get_all(copy, "X-CodeTwoProcessed") == ["true"]


async def test_listeners_keep_a_deep_accept_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio's default backlog (100) overflowed under a burst in the benchmark's open loop, and an
    overflowed accept queue leaves clients waiting for a greeting that never comes: both kinds of
    listener ask the kernel for LISTEN_BACKLOG."""
    import asyncio
    import ssl

    from relay.config import Listener
    from relay.smtp import server

    loop = asyncio.get_running_loop()
    seen: list[object] = []
    real = loop.create_server

    async def spy(*a: Any, **k: Any) -> Any:
        seen.append(k.get("backlog"))
        return await real(*a, **k)

    monkeypatch.setattr(loop, "create_server", spy)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for listener, tls in ((Listener("127.0.0.1", free_port()), None),
                          (Listener("127.0.0.1", free_port(), implicit_tls=True), ctx)):
        srv = await server.start_listener(lambda **_: None, listener, tls, server.Guard())  # type: ignore[arg-type]
        srv.close()
        await srv.wait_closed()
    assert seen == [server.LISTEN_BACKLOG] * 2 and server.LISTEN_BACKLOG >= 1024


async def test_the_ehlo_reply_goes_out_in_one_write(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """aiosmtpd writes each line of a multi-line reply on its own (one send(), under TLS one TLS
    record, per line); the relay writes the EHLO reply at once, the same lines in the same order,
    before and after STARTTLS. A refused EHLO still gets its 501."""
    import asyncio

    from tests.protocol.rawsmtp import Raw
    from tests.protocol.test_security import client_ctx

    writes: list[bytes] = []
    real = asyncio.StreamWriter.write

    def counting(self: asyncio.StreamWriter, data: bytes) -> None:
        if bytes(data).startswith(b"250"):
            writes.append(bytes(data))
        real(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", counting)
    c = await Raw.open(stack.deployment.relay_port)
    await c.reply()
    for tls in (False, True):
        writes.clear()
        reply = await c.cmd(b"EHLO exo.test")
        lines = reply.splitlines()
        assert lines[0] == "250-smtp.signature-relay.test" and lines[-1] == "250 HELP"
        assert ("250-STARTTLS" in lines) is not tls and "250-PIPELINING" in lines
        assert not any(line[4:].startswith("AUTH") for line in lines)
        assert writes == ["\r\n".join(lines).encode() + b"\r\n"]  # one write, exactly the reply
        if not tls:
            assert (await c.cmd(b"STARTTLS")).startswith("220")
            await c.starttls(client_ctx(stack))
    assert (await c.cmd(b"EHLO")).startswith("501")
    assert (await c.cmd(b"NOOP")).startswith("250")  # nothing held back in between
    c.close()


async def test_a_pipelined_groups_replies_go_out_in_one_write(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 2920 §3.2: MAIL, RCPTs and DATA sent as one group (Exchange Online's way) get their
    replies in one write, in order; so do the final 250 and QUIT's 221 when QUIT follows the dot;
    any other reply (an error, 354) writes what was held first; a client that waits for each
    reply gets each at once."""
    import asyncio

    from tests.protocol.test_security import session

    writes: list[bytes] = []
    real = asyncio.StreamWriter.write

    def counting(self: asyncio.StreamWriter, data: bytes) -> None:
        # The relay's replies to us: not our commands, not the in-process sink's to the relay.
        if (self.get_extra_info("sockname") or ("", 0))[1] == stack.deployment.relay_port:
            writes.append(bytes(data))
        real(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", counting)
    c = await session(stack)  # over TLS: the group is one record, so it arrives in one read
    writes.clear()
    await c.send(b"MAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\n"
                 b"DATA\r\n")
    got = [await c.reply() for _ in range(4)]
    assert [g[:3] for g in got] == ["250", "250", "250", "354"]
    assert writes == ["\r\n".join(got).encode() + b"\r\n"]
    writes.clear()
    await c.send(message() + b"\r\n.\r\nRSET\r\nNOOP\r\n")  # as transaction() in test_security sends it
    got = [await c.reply(wait=30) for _ in range(3)]
    assert [g[:3] for g in got] == ["250", "250", "250"] and len(writes) == 1
    writes.clear()
    # An error in the middle: the 250 before it goes out with it, the error is not held.
    await c.send(b"MAIL FROM:<alice@contoso.com>\r\nRCPT TO:\r\nDATA\r\n")
    got = [await c.reply() for _ in range(3)]
    assert got[0][:3] == "250" and got[1][:1] == "5" and got[2][:1] in "45"
    assert writes[0] == ("\r\n".join(got[:2]) + "\r\n").encode() and len(writes) == 2
    # One command at a time: each reply comes at once (nothing waits for a group).
    assert (await c.cmd(b"RSET")).startswith("250") and (await c.cmd(b"NOOP")).startswith("250")
    # A pipelined EHLO: the NOOP's 250 before the EHLO reply, in one write.
    writes.clear()
    await c.send(b"NOOP\r\nEHLO mail-x.outbound.protection.outlook.com\r\n")
    noop, ehlo = await c.reply(), await c.reply()
    assert noop.startswith("250 ") and ehlo.startswith("250-") and len(writes) == 1
    await c.send(b"NOOP\r\nQUIT\r\n")
    assert (await c.reply())[:3] == "250" and (await c.reply())[:3] == "221"
    c.close()


async def test_help_lists_data(stack: Any) -> None:
    """The relay's own DATA reader replaces aiosmtpd's smtp_DATA; HELP still knows the command."""
    from tests.protocol.test_security import session

    c = await session(stack)
    assert "DATA" in (await c.cmd(b"HELP")).split()
    assert await c.cmd(b"HELP DATA") == "250 Syntax: DATA"
    c.close()


async def test_help_lists_what_ehlo_offers(stack: Any) -> None:
    """HELP listed AUTH, which the relay never offers (EHLO does not advertise it), and left out
    STARTTLS, which it does (the relay's own smtp_STARTTLS had lost aiosmtpd's HELP text)."""
    from tests.protocol.test_security import session

    c = await session(stack)
    listed = (await c.cmd(b"HELP")).split()
    assert "STARTTLS" in listed and "AUTH" not in listed
    assert (await c.cmd(b"HELP AUTH")).startswith("501 Supported commands:")
    assert await c.cmd(b"HELP STARTTLS") == "250 Syntax: STARTTLS"
    assert (await c.cmd(b"AUTH PLAIN")).startswith("504")  # sent anyway: refused as before
    assert "AUTH" not in await c.cmd(b"EHLO mail-x.outbound.protection.outlook.com")
    c.close()
