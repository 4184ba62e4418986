"""Issue #10, "Security II": each finding of the second round of attacks, against the real relay
over real sockets. Every test here failed before its fix (see the issue note for how each was
checked); the issue #5 matrix in test_security.py stays green beside them."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import time
from collections.abc import Awaitable, Callable

import pytest

from tests.protocol.conftest import Stack, journal
from tests.protocol.rawsmtp import Raw
from tests.protocol.test_security import client_ctx, configure, session, transaction
from tests.support import CONTOSO_ID, Deployment, free_port, message

MakeStack = Callable[..., Awaitable[Stack]]
CEO = b"From: CEO <ceo@bank.example>"
ALICE = b"From: Alice <alice@contoso.com>"


def with_template(dep: Deployment, html: str, text: str | None = None) -> None:
    """Contoso: one rule for everyone with template ``t``."""
    sig = dep.root / "signatures" / "contoso"
    sig.mkdir(parents=True, exist_ok=True)
    (sig / "t.html.j2").write_text(html)
    if text is not None:
        (sig / "t.txt.j2").write_text(text)
    (dep.root / "rules" / "contoso" / "rules.toml").write_text('[[rule]]\nname = "Everyone"\nnew = "t"\n')


# --- 1. bare CR / LF / NUL in the header: what we bind is what the tenant gets ------------------------

HEADER_TRICKS = {
    # The reported bypass: a bare CR inside a value hides a From:, and CR CR LF ends the header
    # for aiosmtplib (which makes every bare CR a CRLF) but not for a CRLF-only scanner.
    "bare-cr": b"X-A: a\r" + CEO + b"\r\n\r\r\n" + ALICE + b"\r\n",
    "bare-lf": b"X-A: a\n" + CEO + b"\r\n\n" + ALICE + b"\r\n",
    "cr-cr-lf": CEO + b"\r\r\n" + ALICE + b"\r\n",
    "lf-in-value": b"Subject: hi\n" + CEO + b"\r\n" + ALICE + b"\r\n",
}


@pytest.mark.parametrize("trick", list(HEADER_TRICKS), ids=str)
async def test_header_line_break_tricks_cannot_bind_an_outsiders_from(stack: Stack, trick: str) -> None:
    raw = (f"X-MS-Exchange-CrossTenant-Id: {CONTOSO_ID}\r\n".encode() + HEADER_TRICKS[trick]
           + b"To: <bob@example.net>\r\nSubject: pay\r\n\r\nPlease pay the invoice.\r\n")
    c = await session(stack)
    replies = await transaction(c, b"<alice@contoso.com>", [b"<bob@example.net>"], raw)
    c.close()
    final = replies[-1]
    if final.startswith("250"):
        # Only acceptable if the tenant got a header whose every From: is alice's.
        [got] = stack.deployment.delivered()
        msg = email.message_from_bytes(got, policy=email.policy.compat32)
        froms = msg.get_all("From") or []
        assert froms and all("alice@contoso.com" in v for v in froms), got[:600]
    else:
        assert final.startswith("550 5.7.1"), replies
        assert stack.deployment.delivered() == []


async def test_nul_in_the_header_is_refused(stack: Stack) -> None:
    raw = b"X-A: a\x00" + CEO + b"\r\n" + ALICE + b"\r\nTo: <b@example.net>\r\nSubject: s\r\n\r\nbody\r\n"
    c = await session(stack)
    replies = await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], raw)
    c.close()
    assert replies[-1].startswith("554 5.6.0"), replies
    assert stack.deployment.delivered() == []


async def test_normalised_message_is_what_is_stamped_and_delivered(make_stack: MakeStack,
                                                                   deployment: Deployment) -> None:
    """Binding, stamping and delivery read one normalised message: a bare-LF message is stamped
    and arrives with CRLF only, the signature in it."""
    with_template(deployment, "<p>SIG {{ user.mail }}</p>\n", "SIG {{ user.mail }}\n")
    st = await make_stack()
    raw = b"From: Alice <alice@contoso.com>\nTo: b@example.net\nSubject: lf\n\nHello\nBob\n"
    c = await session(st)
    assert (await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], raw))[-1].startswith("250")
    c.close()
    [got] = st.deployment.delivered()
    assert b"SIG alice@contoso.com" in got
    assert b"\n" not in got.replace(b"\r\n", b"") and b"\r" not in got.replace(b"\r\n", b"")


# --- 2. STARTTLS inside TLS; slots released on every way a session ends ---------------------------


async def test_starttls_inside_tls_is_503_and_frees_its_slot(stack: Stack) -> None:
    c = await session(stack)
    assert (await c.cmd(b"STARTTLS")) == "503 5.5.1 TLS already active"  # RFC 3207 §4.2
    assert (await c.cmd(b"NOOP")).startswith("250")  # the session goes on, unharmed
    c.close()
    await asyncio.sleep(0.3)
    assert stack.relay.guard.active == 0 and not stack.relay.guard.per_ip


async def test_abandoned_sessions_never_exhaust_the_slots(make_stack: MakeStack, deployment: Deployment) -> None:
    """Every way a session can end gives its slot back: QUIT, reset, a second STARTTLS left
    hanging with the socket open (the reported leak: the idle timer never released it), silence
    until the idle timeout. With 4 slots, 12 such sessions later a client still gets a 220."""
    configure(deployment, security="max_connections_per_ip = 4\nmax_connections = 4", listen="idle_timeout = 1")
    st = await make_stack()
    hanging: list[Raw] = []
    for i in range(12):
        c = await session(st)
        kind = i % 4
        if kind == 0:
            await c.cmd(b"QUIT")
            c.close()
        elif kind == 1:
            await c.send(b"STARTTLS\r\n")  # inside TLS already; then never a handshake
            hanging.append(c)
        elif kind == 2:
            c.writer.transport.abort()
        else:
            hanging.append(c)  # silence until the idle timeout
        await asyncio.sleep(0.3)
    await asyncio.sleep(2.5)
    assert st.relay.guard.active == 0, st.relay.guard.per_ip
    ok = await Raw.open(deployment.relay_port)
    assert (await ok.reply()).startswith("220")
    for c in [ok, *hanging]:
        c.close()


# --- 4. admission before the TLS handshake (implicit TLS) -----------------------------------------


def implicit_tls(deployment: Deployment, security: str = "") -> int:
    port = free_port()
    configure(deployment, security=security, listen=f'idle_timeout = 30\nimplicit_tls = ["127.0.0.1:{port}"]')
    return port


async def test_refused_network_is_closed_at_accept_before_any_tls(make_stack: MakeStack,
                                                                   deployment: Deployment) -> None:
    port = implicit_tls(deployment, security='allowed_networks = ["192.0.2.0/24"]')
    text = deployment.config_path.read_text()
    deployment.config_path.write_text(text.replace('allowed_networks = ["127.0.0.0/8", "::1/128"]\n', ""))
    st = await make_stack()
    t0 = time.monotonic()
    c = await Raw.open(port)
    # No ClientHello sent: a server that waits for one before checking would hang here.
    assert await c.reader.read() == b""  # closed, and not one TLS byte (no ServerHello, no alert)
    assert time.monotonic() - t0 < 2
    c.close()
    assert st.relay.guard.active == 0


async def test_pending_handshakes_count_against_the_caps_and_time_out(make_stack: MakeStack,
                                                                      deployment: Deployment) -> None:
    port = implicit_tls(deployment, security="max_connections_per_ip = 2\ntls_handshake_timeout = 1")
    st = await make_stack()
    a, b = await Raw.open(port), await Raw.open(port)  # TCP only: handshakes never started
    await asyncio.sleep(0.2)
    assert st.relay.guard.active == 2  # admitted at accept, before any TLS
    c = await Raw.open(port)
    assert await asyncio.wait_for(c.reader.read(), 2) == b""  # over the per-IP cap: closed at once
    assert await a.closed(wait=4) and await b.closed(wait=4)  # the handshake bound
    await asyncio.sleep(0.2)
    assert st.relay.guard.active == 0
    # and a real client still gets in and relays
    d = await Raw.open(port)
    await d.starttls(client_ctx(st))
    assert (await d.reply()).startswith("220")
    assert (await d.cmd(b"EHLO x")).startswith("250")
    d.close()
    for x in (a, b, c):
        x.close()


# --- 5. header size and field count; no event-loop stall -------------------------------------------


async def test_too_many_header_fields_is_552_without_stalling_the_loop(stack: Stack) -> None:
    raw = message(extra_headers="X-F: v\r\n" * 1_000_000)  # ~8 MB of header
    stalls: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            stalls.append(now - last)
            last = now

    p = asyncio.create_task(probe())
    c = await session(stack)
    replies = await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], raw)
    done.set()
    await p
    c.close()
    assert replies[-1].startswith("552 5.3.4"), replies
    assert max(stalls) < 0.5, max(stalls)  # was several seconds: the header parsed on the loop


async def test_header_field_count_limit(make_stack: MakeStack, deployment: Deployment) -> None:
    configure(deployment, security="max_header_fields = 100")
    st = await make_stack()
    c = await session(st)
    ok = await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], message(extra_headers="X-F: v\r\n" * 80))
    over = await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"],
                             message(extra_headers="X-F: v\r\n" * 120))
    # folded continuation lines are part of one field, not more fields
    folded = await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"],
                               message(extra_headers="X-F: v\r\n" + " more\r\n" * 300))
    c.close()
    assert ok[-1].startswith("250") and folded[-1].startswith("250"), (ok, folded)
    assert over[-1].startswith("552 5.3.4"), over


# --- 3. MIME structure injection through template context ------------------------------------------

INJECTING_SUBJECT = "=?utf-8?q?hi=0D=0A--b1=0D=0AContent-Type:_text/html=0D=0A=0D=0A<h1>phish</h1>?="


async def test_subject_cannot_inject_a_mime_part(make_stack: MakeStack, deployment: Deployment) -> None:
    with_template(deployment, "<p>Re: {{ message.subject }}</p>\n", "Re: {{ message.subject }}\n")
    st = await make_stack()
    raw = (f"From: Alice <alice@contoso.com>\r\nTo: b@example.net\r\nSubject: {INJECTING_SUBJECT}\r\n"
           "MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b1\r\n\r\n"
           "--b1\r\nContent-Type: text/plain\r\n\r\nHello\r\n"
           "--b1\r\nContent-Type: text/html\r\n\r\n<html><body><p>Hello</p></body></html>\r\n--b1--\r\n").encode()
    c = await session(st)
    assert (await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], raw))[-1].startswith("250")
    c.close()
    [got] = st.deployment.delivered()
    msg = email.message_from_bytes(got, policy=email.policy.compat32)
    assert [p.get_content_type() for p in msg.walk()] == ["multipart/alternative", "text/plain", "text/html"]
    assert b"phish" not in got.split(b"\r\n\r\n", 1)[1]  # (the encoded Subject: itself still says it)
    assert got.endswith(raw + b"\r\n")  # passed through untouched (signature-contains-boundary)


async def test_control_characters_never_reach_the_signature(make_stack: MakeStack, deployment: Deployment) -> None:
    with_template(deployment, "<p>[{{ message.subject }}]</p>\n", "[{{ message.subject }}]\n")
    st = await make_stack()
    raw = message(extra_headers="").replace(b"Subject: Lunch", b"Subject: =?utf-8?q?a=0D=0Ab=1B[31mc?=")
    c = await session(st)
    assert (await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], raw))[-1].startswith("250")
    c.close()
    [got] = st.deployment.delivered()
    assert b"[a  b [31mc]" in got  # CR, LF and ESC each became a space


# --- 6. signature identity from Sender: only when it is the envelope sender ---------------------------


async def test_unchecked_sender_field_does_not_earn_another_users_signature(make_stack: MakeStack,
                                                                             deployment: Deployment) -> None:
    with_template(deployment, "<p>SIG-OF {{ user.mail }}</p>\n", "SIG-OF {{ user.mail }}\n")
    st = await make_stack()
    forged = message(extra_headers="Sender: Dave <dave@contoso.com>\r\n")
    c = await session(st)
    assert (await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], forged))[-1].startswith("250")
    # The real send-on-behalf: Exchange Online puts the delegate in MAIL FROM and Sender:.
    assert (await transaction(c, b"<dave@contoso.com>", [b"<b@example.net>"], forged))[-1].startswith("250")
    c.close()
    first, second = st.deployment.delivered()
    assert b"SIG-OF alice@contoso.com" in first and b"dave@" not in first.split(b"\r\n\r\n", 1)[1]
    assert b"SIG-OF dave@contoso.com" in second


# --- 7. log injection ---------------------------------------------------------------------------------


async def test_peer_values_are_escaped_in_log_lines(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    c = await session(stack)
    r = await c.cmd(b'MAIL FROM:<"\x1b[2J\x1b[31mforged\rFAKE LINE"@example.org>')
    assert r.startswith("550"), r
    c.close()
    lines = [rec.getMessage() for rec in caplog.records if "refused at MAIL" in rec.getMessage()]
    assert lines, [rec.getMessage() for rec in caplog.records]
    assert all("\x1b" not in ln and "\r" not in ln and "\n" not in ln for ln in lines), lines
    assert any("\\x1b[31mforged" in ln for ln in lines)


def test_safe_formatter_escapes_whatever_a_call_site_passes() -> None:
    from relay.log import SafeFormatter

    rec = logging.LogRecord("relay", logging.INFO, __file__, 1, "sink refused MAIL from %s", ("a\r\nFAKE: b\x1b",),
                            None)
    out = SafeFormatter("%(message)s").format(rec)
    assert out == "sink refused MAIL from a\\r\\nFAKE: b\\x1b"


# --- 8. template resource limits -------------------------------------------------------------------


@pytest.mark.parametrize("template", [
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}\n",  # RecursionError escaped the guard: 451
    "{{ 'a' * 100000000 }}\n",  # 100 MB into every message
    "{{ message.subject * 1000000 }}\n",
    "{% for i in range(100000) %}{{ 'x' * 60000 }}{% endfor %}\n",  # bounded output
], ids=["recursion", "repeat-literal", "repeat-subject", "loop-output"])
async def test_template_resource_abuse_passes_the_message_through(make_stack: MakeStack, deployment: Deployment,
                                                                  template: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    with_template(deployment, template)
    st = await make_stack()
    raw = message()
    c = await session(st)
    t0 = time.monotonic()
    replies = await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], raw)
    c.close()
    assert replies[-1].startswith("250"), replies  # never a 451 that repeats on every retry
    assert time.monotonic() - t0 < 20
    [got] = st.deployment.delivered()
    assert got.endswith(raw + b"\r\n") and len(got) < len(raw) + 2000  # unstamped: only our trace fields
    assert any("render_error=" in r.getMessage() and "t.html.j2" in r.getMessage() for r in caplog.records)


def test_check_names_the_file_of_a_recursive_template(deployment: Deployment,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from relay import cli

    with_template(deployment, "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}\n")
    (deployment.root / "rules" / "contoso" / "directory.csv").write_text("mail,displayName\nalice@contoso.com,Alice\n")
    code = cli.main(["check", "--config", str(deployment.config_path)])
    out = capsys.readouterr()
    assert code != 0
    assert "t.html.j2" in out.out + out.err and "RecursionError" in out.out + out.err


# --- 9. internationalised domains ----------------------------------------------------------------------


async def test_lookalike_envelope_domain_does_not_bind(stack: Stack) -> None:
    c = await session(stack)
    # U+212A KELVIN SIGN: "fabri\u212aam.com".lower() == "fabrikam.com"
    r = await c.cmd("MAIL FROM:<eve@fabri\u212aam.com> SMTPUTF8".encode())
    assert r.startswith("550 5.7.1"), r
    r = await c.cmd("MAIL FROM:<eve@\uff46abrikam.com> SMTPUTF8".encode())  # fullwidth f
    assert r.startswith("550 5.7.1"), r
    c.close()


async def test_smtputf8_mail_from_a_unicode_domain_is_relayed(make_stack: MakeStack, deployment: Deployment) -> None:
    f = deployment.root / "rules" / "contoso" / "tenant.toml"
    f.write_text(f.read_text().replace('accepted_domains = ["contoso.com"]',
                                       'accepted_domains = ["contoso.com", "bücher.example"]'))
    st = await make_stack()
    assert "xn--bcher-kva.example" in st.cfg.tenants[0].accepted_domains
    raw = ("From: Alice <alice@bücher.example>\r\nTo: <b@example.net>\r\nSubject: UTF-8\r\n"
           f"X-MS-Exchange-CrossTenant-Id: {CONTOSO_ID}\r\n\r\nGrüße\r\n").encode()
    c = await session(st)
    replies = await transaction(c, "<alice@bücher.example> SMTPUTF8".encode(), [b"<b@example.net>"], raw)
    c.close()
    assert replies[-1].startswith("250"), replies
    [rec] = journal(st.deployment)
    assert rec["mail_from"] == "alice@bücher.example"


# --- 10. replies in the right place ---------------------------------------------------------------------


async def test_non_ascii_mail_from_without_smtputf8_is_553_at_mail(stack: Stack) -> None:
    c = await session(stack)
    r = await c.cmd("MAIL FROM:<jürgen@contoso.com>".encode())
    assert r.startswith("553 5.6.7"), r
    assert (await c.cmd(b"MAIL FROM:<alice@contoso.com>")).startswith("250")
    r = await c.cmd("RCPT TO:<jürgen@example.net>".encode())
    assert r.startswith("553 5.6.7"), r
    c.close()


async def test_data_line_over_the_limit_is_a_4xx_not_a_bounce(make_stack: MakeStack, deployment: Deployment) -> None:
    configure(deployment, security="max_line_length = 2000")
    st = await make_stack()
    c = await session(st)
    replies = await transaction(c, b"<alice@contoso.com>", [b"<b@example.net>"], message(body="z" * 5000 + "\r\n"))
    assert replies[-1].startswith("451 4.6.0"), replies
    assert (await c.cmd(b"NOOP")).startswith("250")
    c.close()
    assert st.deployment.delivered() == []
