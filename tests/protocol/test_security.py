"""Issue #5 security matrix: the real relay over real sockets. Each protection has a test that
fails when the protection is removed."""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from relay import certs
from relay.sink import SinkBehavior
from tests.protocol.conftest import Stack, journal
from tests.protocol.rawsmtp import Raw
from tests.support import CONTOSO_ID, FABRIKAM_ID, Deployment, message

MakeStack = Callable[..., Awaitable[Stack]]


def configure(dep: Deployment, security: str = "", listen: str = "") -> None:
    text = dep.config_path.read_text()
    if security:
        text = text.replace("[security]\n", "[security]\n" + security + "\n")
    if listen:
        text = text.replace("idle_timeout = 30\n", listen + "\n")
    dep.config_path.write_text(text)


def client_ctx(st: Stack, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(st.cfg.certs.ca_cert))
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


async def session(st: Stack, cert: tuple[Path, Path] | None = None, sni: str = "smtp.signature-relay.test") -> Raw:
    c = await Raw.open(st.deployment.relay_port)
    assert (await c.reply()).startswith("220")
    await c.cmd(b"EHLO mail-x.outbound.protection.outlook.com")
    assert (await c.cmd(b"STARTTLS")).startswith("220")
    await c.starttls(client_ctx(st, cert), server_hostname=sni)
    assert (await c.cmd(b"EHLO mail-x.outbound.protection.outlook.com")).startswith("250")
    return c


async def transaction(c: Raw, frm: bytes, rcpts: list[bytes], data: bytes) -> list[str]:
    replies = [await c.cmd(b"MAIL FROM:" + frm)]
    for r in rcpts:
        replies.append(await c.cmd(b"RCPT TO:" + r))
    d = await c.cmd(b"DATA")
    replies.append(d)
    if d.startswith("354"):
        await c.send(data + b"\r\n.\r\n")
        replies.append(await c.reply())
    return replies


# --- 1. open relay matrix ---------------------------------------------------------------------

SENDERS = [b"<antispam@example.org>", b"<antispam@[127.0.0.1]>", b"<relaytest%example.org@[127.0.0.1]>",
           b'<"relaytest@example.org">', b"<example.org!relaytest>", b"<@mx.example.org:antispam@example.org>",
           b"<>", b"<postmaster>"]
RECIPIENTS = [b"<relaytest@example.org>", b"<relaytest%example.org@contoso.com>", b'<"relaytest@example.org">',
              b"<example.org!relaytest@contoso.com>", b"<@contoso.com:relaytest@example.org>",
              b"<relaytest@[192.0.2.1]>"]


async def test_open_relay_matrix_from_unknown_tenant(stack: Stack) -> None:
    for frm in SENDERS:
        c = await session(stack)
        replies = await transaction(c, frm, RECIPIENTS, message(frm="antispam@example.org"))
        c.close()
        mail, rcpts, final = replies[0], replies[1:1 + len(RECIPIENTS)], replies[-1]
        assert not final.startswith("250"), (frm, final)
        if frm != b"<>":
            # Refused at MAIL already, so no recipient is ever accepted.
            assert mail.startswith("550 5.7.1"), (frm, mail)
            assert not any(r.startswith("250") for r in rcpts), (frm, rcpts)
        # (A null sender is only decided after DATA, by X-MS-Exchange-CrossTenant-Id: RCPT gets 250.)
    assert stack.deployment.delivered() == []


async def test_open_relay_matrix_from_disallowed_network(make_stack: MakeStack, deployment: Deployment) -> None:
    configure(deployment, security='allowed_networks = ["192.0.2.0/24"]')
    text = deployment.config_path.read_text()
    deployment.config_path.write_text(text.replace('allowed_networks = ["127.0.0.0/8", "::1/128"]\n', ""))
    st = await make_stack()
    for frm in [*SENDERS, b"<alice@contoso.com>"]:
        c = await Raw.open(deployment.relay_port)
        greeting = await c.reply()
        assert greeting.startswith("554 5.7.1"), greeting
        for line in (b"EHLO x", b"MAIL FROM:" + frm, b"RCPT TO:" + RECIPIENTS[0], b"DATA"):
            try:
                r = await c.cmd(line)
            except (ConnectionError, asyncio.IncompleteReadError):
                break
            assert not r.startswith(("250", "354")), (frm, line, r)
        assert await c.closed()
        c.close()
    assert st.deployment.delivered() == []


# --- 2. cross-tenant injection -----------------------------------------------------------------


@pytest.mark.parametrize(("tid", "envelope", "from_hdr"), [
    (FABRIKAM_ID, "ceo@contoso.com", "ceo@contoso.com"),  # B's id, A's addresses
    (FABRIKAM_ID, "eve@fabrikam.com", "ceo@contoso.com"),  # B's id and sender, A's From:
    (CONTOSO_ID, "eve@fabrikam.com", "eve@fabrikam.com"),  # A's id claimed by B's sender
])
async def test_cross_tenant_injection_is_refused(make_stack: MakeStack, deployment: Deployment,
                                                 tid: str, envelope: str, from_hdr: str) -> None:
    text = deployment.config_path.read_text().replace("sender_domain = true", "sender_domain = false")
    deployment.config_path.write_text(text)
    st = await make_stack()
    c = await session(st)
    raw = message(frm=from_hdr, extra_headers=f"X-MS-Exchange-CrossTenant-Id: {tid}\r\n")
    replies = await transaction(c, f"<{envelope}>".encode(), [b"<bob@example.net>"], raw)
    c.close()
    assert replies[-1].startswith("550 5.7.1"), replies
    assert journal(st.deployment) == []  # nothing reached any tenant endpoint, A's in particular


async def test_sni_naming_another_tenant_is_refused(make_stack: MakeStack) -> None:
    st = await make_stack()
    raw = message(extra_headers=f"X-MS-Exchange-CrossTenant-Id: {CONTOSO_ID}\r\n")
    c = await session(st, sni="fabrikam-2b9x1k.smtp.signature-relay.test")
    assert (await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], raw))[-1].startswith("550 5.7.1")
    c.close()
    c = await session(st, sni="contoso-7q4k2m.smtp.signature-relay.test")
    assert (await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], raw))[-1].startswith("250")
    c.close()


async def test_tenant_networks_narrow_the_binding(make_stack: MakeStack, deployment: Deployment) -> None:
    f = deployment.root / "rules" / "contoso" / "tenant.toml"
    f.write_text(f.read_text() + '\n[binding]\nnetworks = ["10.0.0.0/8"]\n')
    st = await make_stack()
    c = await session(st)
    assert (await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], message()))[-1].startswith("550")
    c.close()


# --- 3. mutual TLS --------------------------------------------------------------------------------


async def test_mutual_tls_requires_exchange_onlines_certificate(make_stack: MakeStack, deployment: Deployment,
                                                                tmp_path: Path) -> None:
    configure(deployment, security='require_client_cert = true\nclient_ca = "certs/ca.crt"')
    st = await make_stack()
    ca = certs.load_pair(st.cfg.certs.ca_cert, st.cfg.certs.ca_key)
    exo = certs.issue(*ca, ["mail.protection.outlook.com"], 30, server=True, client=True)
    exo_files = (tmp_path / "exo.crt", tmp_path / "exo.key")
    certs.save(*exo, *exo_files)
    other = (st.cfg.tenants[0].client_cert, st.cfg.tenants[0].client_key)  # valid chain, wrong name

    c = await session(st)
    assert (await c.cmd(b"MAIL FROM:<alice@contoso.com>")).startswith("530 5.7.0")
    c.close()
    c = await session(st, cert=other)
    assert (await c.cmd(b"MAIL FROM:<alice@contoso.com>")).startswith("550 5.7.1")
    c.close()
    c = await session(st, cert=exo_files)
    assert (await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], message()))[-1].startswith("250")
    c.close()


# --- 4. SMTP smuggling ----------------------------------------------------------------------------

SMUGGLE_ENDINGS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r\n.\n", b"\n.\r", b"\r.\n", b"\r.\r\n",
                   b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n .\r\n"]


@pytest.mark.parametrize("ending", SMUGGLE_ENDINGS, ids=repr)
async def test_smuggling_variants_deliver_exactly_one_message(stack: Stack, ending: bytes) -> None:
    c = await session(stack)
    smuggled = (b"MAIL FROM:<ceo@contoso.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
                b"From: ceo@contoso.com\r\nSubject: smuggled\r\n\r\nPay the invoice.\r\n")
    data = message() + b"first part" + ending + smuggled
    replies = await transaction(c, b"<alice@contoso.com>", [b"<bob@example.net>"], data)
    assert replies[-1].startswith("250"), replies
    # nothing after the one real end of data was taken as a command
    assert (await c.cmd(b"NOOP")).startswith("250")
    c.close()
    recs = journal(stack.deployment)
    assert len(recs) == 1 and recs[0]["rcpt_tos"] == ["bob@example.net"]
    [got] = stack.deployment.delivered()
    assert b"Pay the invoice." in got  # the would-be second message is body text of the first


# The DATA reader decides whether ingress rewrites line endings (wire.CrlfCheck: it counts CR and
# LF a read at a time). A CR that ends one read is half of a CRLF only if the next read starts with
# LF; whatever the reads, the tenant gets no bare CR or LF.
SPLITS = [(b"first\r", b"x second", b"first\r\nx second"),    # a bare CR at the end of a read
          (b"first", b"\nsecond", b"first\r\nsecond"),       # a bare LF at the start of the next
          (b"first\r", b"\r\nsecond", b"first\r\n\r\nsecond"),  # CR, then the next read's CRLF
          (b"first\r", b"\nsecond", b"first\r\nsecond")]     # a CRLF split between two reads


@pytest.mark.parametrize(("before", "after", "want"), SPLITS, ids=repr)
async def test_a_line_end_split_between_reads_is_judged_whole(stack: Stack, before: bytes, after: bytes,
                                                              want: bytes) -> None:
    c = await session(stack)
    assert (await c.cmd(b"MAIL FROM:<alice@contoso.com>")).startswith("250")
    assert (await c.cmd(b"RCPT TO:<bob@example.net>")).startswith("250")
    assert (await c.cmd(b"DATA")).startswith("354")
    await c.send(message(body="") + before)
    await asyncio.sleep(0.3)  # the relay reads the first part on its own (one TLS record, one read)
    await c.send(after + b"\r\n.\r\n")
    assert (await c.reply()).startswith("250")
    c.close()
    [got] = stack.deployment.delivered()
    assert want + b"\r\n" in got
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", got) is None


# --- 5. STARTTLS command injection (CVE-2024-34083 class) -----------------------------------------


async def test_plaintext_pipelined_after_starttls_is_discarded(stack: Stack) -> None:
    c = await Raw.open(stack.deployment.relay_port)
    await c.reply()
    await c.cmd(b"EHLO x")
    await c.send(b"STARTTLS\r\nMAIL FROM:<alice@contoso.com>\r\n")
    assert (await c.reply()).startswith("220")
    await c.starttls(client_ctx(stack))
    ehlo = await c.cmd(b"EHLO x")
    assert ehlo.startswith("250-"), ehlo  # the EHLO reply, not a reply to the injected MAIL
    assert (await c.cmd(b"MAIL FROM:<alice@contoso.com>")).startswith("250")  # no "nested MAIL"
    c.close()


async def test_talking_before_the_greeting_is_refused(make_stack: MakeStack, deployment: Deployment) -> None:
    configure(deployment, security="greeting_delay = 0.5")
    st = await make_stack()
    c = await Raw.open(deployment.relay_port)
    await c.send(b"EHLO early\r\n")
    assert (await c.reply()).startswith("554 5.5.1")
    assert await c.closed()
    polite = await Raw.open(deployment.relay_port)
    assert (await polite.reply()).startswith("220")
    polite.close()
    assert st.deployment.delivered() == []


async def test_a_recipient_that_is_not_a_mailbox_is_a_syntax_error(stack: Stack) -> None:
    """RFC 5321 §4.1.2: a forward-path is local-part@domain (only Postmaster may lack a domain).
    aiosmtpd's parser reads <not an address> as a quoted local part; it gets 501 5.1.3 here
    instead of being relayed to the tenant, refused there and bounced to the sender as a DSN."""
    c = await session(stack)
    assert (await c.cmd(b"MAIL FROM:<alice@contoso.com>")).startswith("250")
    for bad in (b"<not an address>", b'<"bob@example.net">', b"<bob@>", b"<@example.net>"):
        r = await c.cmd(b"RCPT TO:" + bad)
        assert r[:1] == "5" and r[4:9] == "5.1.3", (bad, r)  # ours 501, or aiosmtpd's own 553
    for good in (b"<Postmaster>", b'<"bob smith"@example.net>', b"<bob@example.net>"):
        r = await c.cmd(b"RCPT TO:" + good)
        assert r.startswith("250"), (good, r)
    c.close()


# --- 6. limits -----------------------------------------------------------------------------------


async def test_size_limit(make_stack: MakeStack, deployment: Deployment) -> None:
    configure(deployment, listen="idle_timeout = 30\nmax_message_size = 20000")
    st = await make_stack()
    c = await session(st)
    assert (await c.cmd(b"MAIL FROM:<alice@contoso.com> SIZE=20001")).startswith("552")
    replies = await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], message(body="x" * 30000))
    assert replies[-1].startswith("552"), replies
    c.close()
    assert st.deployment.delivered() == []


async def test_recipient_limit_keeps_earlier_recipients(make_stack: MakeStack, deployment: Deployment) -> None:
    configure(deployment, security="max_recipients = 100")
    st = await make_stack()
    c = await session(st)
    rcpts = [f"<r{i}@example.net>".encode() for i in range(101)]
    replies = await transaction(c, b"<alice@contoso.com>", rcpts, message())
    assert all(r.startswith("250") for r in replies[1:101])
    assert replies[101].startswith("452 4.5.3"), replies[101]
    assert replies[-1].startswith("250")
    c.close()
    [rec] = journal(st.deployment)
    assert len(rec["rcpt_tos"]) == 100  # type: ignore[arg-type]


async def test_command_line_length_limit(stack: Stack) -> None:
    c = await session(stack)
    assert (await c.cmd(b"MAIL FROM:<" + b"a" * 600 + b"@contoso.com>")).startswith("500")
    assert (await c.cmd(b"NOOP " + b"x" * 200_000)).startswith("500")  # multi-hundred-KB line
    assert (await c.cmd(b"NOOP")).startswith("250")  # and the session survives
    c.close()


async def test_connection_caps(make_stack: MakeStack, deployment: Deployment) -> None:
    configure(deployment, security="max_connections_per_ip = 2\nmax_connections = 3")
    st = await make_stack()
    a, b = await Raw.open(deployment.relay_port), await Raw.open(deployment.relay_port)
    assert (await a.reply()).startswith("220") and (await b.reply()).startswith("220")
    c = await Raw.open(deployment.relay_port)
    assert (await c.reply()).startswith("421 4.7.0")
    assert await c.closed()
    a.close()
    await asyncio.sleep(0.2)
    d = await Raw.open(deployment.relay_port)
    assert (await d.reply()).startswith("220")  # a slot came free
    for x in (b, c, d):
        x.close()
    await asyncio.sleep(0.2)
    assert st.relay.guard.active == 0 and not st.relay.guard.per_ip


async def test_idle_timeout_closes(make_stack: MakeStack, deployment: Deployment) -> None:
    configure(deployment, listen="idle_timeout = 1")
    st = await make_stack()
    c = await Raw.open(deployment.relay_port)
    await c.reply()
    assert await c.closed(wait=5)
    assert st.relay.guard.active == 0


async def test_slow_data_sender_is_cut_off(make_stack: MakeStack, deployment: Deployment) -> None:
    configure(deployment, security="min_data_rate = 2000", listen="idle_timeout = 1")
    st = await make_stack()
    c = await session(st)
    await c.cmd(b"MAIL FROM:<alice@contoso.com>")
    await c.cmd(b"RCPT TO:<b@example.net>")
    assert (await c.cmd(b"DATA")).startswith("354")
    got = ""
    for _ in range(40):  # 20 bytes every 0.1 s = 200 B/s, well under 2000 B/s; each chunk keeps it "alive"
        try:
            await c.send(b"x" * 18 + b"\r\n")
        except ConnectionError:
            break
        await asyncio.sleep(0.1)
        if c.reader.at_eof() or c.reader._buffer:  # type: ignore[attr-defined]
            got = await c.reply()
            break
    assert got.startswith("421 4.4.2"), got
    assert st.deployment.delivered() == []


async def test_unknown_commands_are_budgeted(stack: Stack) -> None:
    c = await session(stack)
    replies = [await c.cmd(b"XYZZY") for _ in range(5)]
    assert replies[-1].startswith("502"), replies  # aiosmtpd's unknown-command budget
    assert await c.closed()


async def test_error_replies_are_budgeted(make_stack: MakeStack, deployment: Deployment) -> None:
    configure(deployment, security="max_errors = 3")
    st = await make_stack()
    c = await Raw.open(st.deployment.relay_port)
    await c.reply()
    await c.cmd(b"EHLO x")
    replies = [await c.cmd(b"RCPT TO:<x@y>") for _ in range(3)]  # 530 before STARTTLS: errors
    assert all(r.startswith("530") for r in replies)
    assert (await c.reply()).startswith("421 4.7.0 Too many errors")
    assert await c.closed()


async def test_received_loop_is_554(stack: Stack) -> None:
    loop_hdrs = "".join(f"Received: from hop{i} by hop{i + 1}; Mon, 6 Jan 2025 09:12:43 +0000\r\n"
                        for i in range(50))
    c = await session(stack)
    replies = await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], message(extra_headers=loop_hdrs))
    assert replies[-1].startswith("554 5.4.6"), replies
    c.close()


async def test_long_data_lines_are_accepted_and_relayed_unchanged(stack: Stack) -> None:
    """Policy: lines over 998 octets are relayed as received (up to security.max_line_length):
    Exchange Online accepted the message, so a 5xx here would bounce legitimate mail."""
    long_line = "y" * 5000
    raw = message(body=long_line + "\r\n")
    c = await session(stack)
    assert (await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], raw))[-1].startswith("250")
    c.close()
    [got] = stack.deployment.delivered()
    assert long_line.encode() + b"\r\n" in got


# --- 7. TLS policy and handshake abuse -----------------------------------------------------------


@pytest.mark.parametrize(("cipher", "ok"), [("AES128-SHA", False), ("AES256-SHA256", False),
                                            ("ECDHE-RSA-AES128-SHA", False), ("ECDHE-RSA-AES128-GCM-SHA256", True)])
async def test_tls12_cipher_policy(stack: Stack, cipher: str, ok: bool) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(cipher + ":@SECLEVEL=0")
    c = await Raw.open(stack.deployment.relay_port)
    await c.reply()
    await c.cmd(b"EHLO x")
    await c.cmd(b"STARTTLS")
    try:
        await c.starttls(ctx, server_hostname=None)
        result = True
    except (ssl.SSLError, ConnectionError):
        result = False
    c.close()
    assert result is ok


@pytest.mark.parametrize("garbage", [b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.0\r\n\r\n", b""], ids=repr)
async def test_handshake_garbage_or_silence_is_closed_without_leaks(make_stack: MakeStack, deployment: Deployment,
                                                                     garbage: bytes) -> None:
    configure(deployment, listen="idle_timeout = 1")
    st = await make_stack()
    before = len(asyncio.all_tasks())
    c = await Raw.open(deployment.relay_port)
    await c.reply()
    await c.cmd(b"EHLO x")
    assert (await c.cmd(b"STARTTLS")).startswith("220")
    if garbage:
        await c.send(garbage)
    assert await c.closed(wait=8)
    c.close()
    await asyncio.sleep(0.3)
    assert st.relay.guard.active == 0
    assert len(asyncio.all_tasks()) <= before  # the session's tasks are gone


def test_open_relay_fixture_sanity() -> None:
    assert re.match(r"<.*>", SENDERS[0].decode())
    assert SinkBehavior() is not None


async def test_bare_lf_message_is_normalised_to_crlf(stack: Stack) -> None:
    """Policy: bare LF (and bare CR) line endings are normalised to CRLF on the way out, never
    relayed as is (a downstream that ends DATA on <LF>.<LF> would otherwise be smuggled into)."""
    c = await session(stack)
    raw = b"From: alice@contoso.com\nTo: b@example.net\nSubject: lf\n\nline one\nline two\rthree\n"
    assert (await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], raw))[-1].startswith("250")
    c.close()
    [got] = stack.deployment.delivered()
    assert b"line one\r\nline two\r\nthree\r\n" in got
    assert b"\n" not in got.replace(b"\r\n", b"")
    assert b"\r" not in got.replace(b"\r\n", b"")


def test_egress_refuses_tls_below_1_2(stack: Stack) -> None:
    from relay.delivery.client import client_context

    ctx = client_context(stack.cfg.delivery, stack.cfg.tenants[0])
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


async def test_total_connection_cap(make_stack: MakeStack, deployment: Deployment) -> None:
    configure(deployment, security="max_connections = 2")
    await make_stack()
    a, b = await Raw.open(deployment.relay_port), await Raw.open(deployment.relay_port)
    assert (await a.reply()).startswith("220") and (await b.reply()).startswith("220")
    c = await Raw.open(deployment.relay_port)
    assert (await c.reply()) == "421 4.7.0 Too many connections, try again later"
    for x in (a, b, c):
        x.close()
