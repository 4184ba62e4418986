"""RFC 2920 pipelining (issue #14). Delivery, against scripted endpoints that answer in every way
RFC 2920 §3.1 allows: MAIL, each RCPT and DATA go out as one group when the endpoint advertises
PIPELINING, every reply is checked, and a deferred recipient still means no message at all. And
the relay's own listener, which advertises PIPELINING to Exchange Online."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import pytest
from aiosmtplib.protocol import SMTPProtocol
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import Config, Tenant
from relay.delivery import client
from relay.delivery.client import Delivery, _Replies
from relay.errors import PermanentError, TransientError
from tests.protocol.rawsmtp import Raw
from tests.protocol.test_relay_protocol import send
from tests.protocol.test_security import client_ctx
from tests.support import Deployment, free_port, message

BODY = (b"From: <alice@contoso.com>\r\nSubject: pipelined\r\n\r\n"
        b"first line\r\n.a line that starts with a dot\r\nlast line\r\n")


@dataclass
class Session:
    """What one connection to the scripted endpoint saw."""

    first_chunk: bytes = b""  # what had arrived when the endpoint first answered after EHLO
    commands: list[bytes] = field(default_factory=list)
    content: bytes | None = None  # the DATA content, dot-stuffed as sent; None: no content at all
    content_started: bool = False  # any octet after a 354
    closed_by_client: bool = False


Script = Callable[[list[bytes], int], list[bytes] | None]


class Endpoint:
    """A plaintext SMTP endpoint on loopback (the benchmark profile's delivery), answering from a
    script: ``script(commands, session_index)`` gives the replies for a group of commands, or None to
    close the connection. Replies go out one write at a time, cut at ``cut`` octets, with a pause
    between writes, so the relay's reader sees every way TCP may split them."""

    def __init__(self, script: Script, *, pipelining: bool = True, cut: int = 0, pause: float = 0.01,
                 coalesce: bool = False, close_on_421: bool = True) -> None:
        self.script, self.pipelining, self.cut, self.pause, self.coalesce = script, pipelining, cut, pause, coalesce
        self.close_on_421 = close_on_421
        self.sessions: list[Session] = []
        self.port = free_port()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Endpoint:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_a: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _write(self, w: asyncio.StreamWriter, replies: Sequence[bytes]) -> None:
        data = b"".join(replies)
        if self.coalesce or not self.cut:
            chunks = [data] if self.coalesce else list(replies)
        else:
            chunks = [data[i:i + self.cut] for i in range(0, len(data), self.cut)]
        for c in chunks:
            w.write(c)
            await w.drain()
            await asyncio.sleep(self.pause)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        s = Session()
        index = len(self.sessions)
        self.sessions.append(s)
        try:
            w.write(b"220 endpoint.test ESMTP\r\n")
            await r.readline()  # EHLO
            ext = [b"250-endpoint.test", b"250-SIZE 157286400", b"250-8BITMIME"]
            w.write(b"\r\n".join([*ext, *([b"250-PIPELINING"] if self.pipelining else []), b"250 SMTPUTF8"]) + b"\r\n")
            await self._transactions(r, w, s, index)
        except (ConnectionError, asyncio.IncompleteReadError):
            s.closed_by_client = True
        finally:
            w.close()

    async def _transactions(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Session, index: int) -> None:
        pending = b""
        while True:
            if not pending:
                await asyncio.sleep(0.05)  # everything a pipelining client wrote at once is here by now
                got = await r.read(65536)
                if not got:
                    s.closed_by_client = True
                    return
                pending = got
                if not s.first_chunk:
                    s.first_chunk = got
            lines = re.findall(rb"[^\n]*\n", pending)
            pending = pending[sum(map(len, lines)):]
            if not lines:
                pending += await r.read(65536)
                continue
            s.commands += lines
            answer = self.script(lines, index)
            if answer is None:
                return
            await self._write(w, answer)
            if lines[-1].upper().startswith(b"QUIT") or (self.close_on_421 and answer[-1].startswith(b"421")):
                return
            if lines[-1].upper().startswith(b"DATA") and any(a.startswith(b"354") for a in answer):
                s.content = pending
                try:
                    while not s.content.endswith(b"\r\n.\r\n"):
                        more = await r.read(65536)
                        if not more:
                            s.closed_by_client = True
                            return
                        s.content += more
                        s.content_started = True
                finally:
                    s.content_started = s.content_started or bool(s.content)
                pending = b""
                await self._write(w, [b"250 2.6.0 <id@endpoint.test> Queued mail for delivery\r\n"])


def answer_all(rcpt: Callable[[bytes], bytes] = lambda _l: b"250 2.1.5 Recipient OK\r\n",
               data: bytes = b"354 Start mail input; end with <CRLF>.<CRLF>\r\n",
               mail: bytes = b"250 2.1.0 Sender OK\r\n") -> Callable[[list[bytes], int], list[bytes]]:
    def script(lines: list[bytes], _index: int) -> list[bytes]:
        out: list[bytes] = []
        for line in lines:
            verb = line[:4].upper()
            if verb == b"MAIL":
                out.append(mail)
            elif verb == b"RCPT":
                out.append(rcpt(line))
            elif verb == b"DATA":
                out.append(data)
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
            else:
                out.append(b"250 2.0.0 OK\r\n")
        return out
    return script


@pytest.fixture
def plaintext(deployment: Deployment) -> Callable[[int], tuple[Delivery, Tenant]]:
    """A Delivery in the benchmark profile (plaintext to a loopback endpoint) aimed at ``port``."""
    def make(port: int, **delivery: object) -> tuple[Delivery, Tenant]:
        p = deployment.config_path
        if "plaintext_loopback_benchmark" not in p.read_text():
            p.write_text(p.read_text().replace("[delivery]\n", "[delivery]\nplaintext_loopback_benchmark = true\n"))
        t = deployment.root / "rules" / "contoso" / "tenant.toml"
        t.write_text(re.sub(r'endpoint = ".*"', f'endpoint = "127.0.0.1:{port}"', t.read_text()))
        cfg: Config = deployment.load()
        tenant = next(t for t in cfg.tenants if t.name == "contoso")
        dcfg = dataclasses.replace(cfg.delivery, **delivery)  # type: ignore[arg-type]
        return Delivery(dcfg, [tenant], local_hostname=cfg.hostname), tenant
    return make


@pytest.fixture
async def closing() -> AsyncIterator[list[Delivery]]:
    made: list[Delivery] = []
    yield made
    for d in made:
        await d.close()


def _verbs(chunk: bytes) -> list[bytes]:
    return [line[:4].upper() for line in chunk.split(b"\r\n") if line]


@pytest.mark.parametrize("cut", [0, 1, 7])
async def test_mail_rcpt_and_data_go_out_as_one_group(plaintext: Any, closing: list[Delivery], cut: int) -> None:
    """Two round trips instead of four, whatever way TCP cuts the replies (one octet at a time
    too), and what arrives is exactly what the sequential path delivers."""
    async with Endpoint(answer_all(), cut=cut) as ep, Endpoint(answer_all(), pipelining=False) as seq:
        d, tenant = plaintext(ep.port)
        closing.append(d)
        out = await d.deliver(tenant, "alice@contoso.com", ["bob@example.net", "carol@example.net"], BODY, crlf=True)
        assert out.accepted == ("bob@example.net", "carol@example.net") and not out.refused
        assert out.reply.startswith("250 2.6.0")
        s = ep.sessions[0]
        assert _verbs(s.first_chunk) == [b"MAIL", b"RCPT", b"RCPT", b"DATA"]

        d2, tenant2 = plaintext(seq.port)
        closing.append(d2)
        await d2.deliver(tenant2, "alice@contoso.com", ["bob@example.net", "carol@example.net"], BODY, crlf=True)
        assert _verbs(seq.sessions[0].first_chunk) == [b"MAIL"]  # not advertised: one command at a time
        assert s.content == seq.sessions[0].content
        assert s.content is not None and b"\r\n..a line that starts with a dot\r\n" in s.content
        assert [c.split(b" ")[0] for c in s.commands] == [c.split(b" ")[0] for c in seq.sessions[0].commands]


async def test_replies_all_in_one_segment(plaintext: Any, closing: list[Delivery]) -> None:
    async with Endpoint(answer_all(), coalesce=True) as ep:
        d, tenant = plaintext(ep.port)
        closing.append(d)
        out = await d.deliver(tenant, "alice@contoso.com", ["bob@example.net"], BODY, crlf=True)
        assert out.accepted == ("bob@example.net",)
        # and the connection is in step for the next message on it
        out = await d.deliver(tenant, "alice@contoso.com", ["bob@example.net"], BODY, crlf=True)
        assert out.reused and len(ep.sessions) == 1


async def test_a_deferred_recipient_after_354_ends_the_connection_before_any_content(
        plaintext: Any, closing: list[Delivery]) -> None:
    """The endpoint accepts one recipient, defers the other and answers DATA with 354 (RFC 2920
    allows it): the relay must not send the message (that would deliver it to one recipient and a
    retry would deliver it again); it closes the connection, which cancels the transaction."""
    def rcpt(line: bytes) -> bytes:
        return b"451 4.4.0 try later\r\n" if b"carol" in line else b"250 2.1.5 OK\r\n"

    async with Endpoint(answer_all(rcpt)) as ep:
        d, tenant = plaintext(ep.port)
        closing.append(d)
        with pytest.raises(TransientError) as e:
            await d.deliver(tenant, "alice@contoso.com", ["bob@example.net", "carol@example.net"], BODY, crlf=True)
        assert e.value.reply.code == 451 and "carol" in e.value.detail
        for _ in range(100):
            if ep.sessions[0].closed_by_client:
                break
            await asyncio.sleep(0.02)
        s = ep.sessions[0]
        assert s.closed_by_client and not s.content_started and not s.content
        # the next message gets a new connection
        ep.script = answer_all()
        await d.deliver(tenant, "alice@contoso.com", ["bob@example.net"], BODY, crlf=True)
        assert len(ep.sessions) == 2


async def test_every_recipient_refused_is_permanent_and_the_connection_stays_usable(
        plaintext: Any, closing: list[Delivery]) -> None:
    script = answer_all(lambda _l: b"550 5.1.10 RESOLVER.ADR.RecipientNotFound\r\n",
                        data=b"554 5.5.1 Error: no valid recipients\r\n")
    async with Endpoint(script) as ep:
        d, tenant = plaintext(ep.port)
        closing.append(d)
        with pytest.raises(PermanentError) as e:
            await d.deliver(tenant, "alice@contoso.com", ["bob@example.net"], BODY, crlf=True)
        assert e.value.reply.code == 550 and e.value.reply.enhanced == "5.1.10"
        assert ep.sessions[0].content is None
        ep.script = answer_all()
        out = await d.deliver(tenant, "alice@contoso.com", ["bob@example.net"], BODY, crlf=True)
        assert out.reused and len(ep.sessions) == 1
        assert b"RSET\r\n" in ep.sessions[0].commands


async def test_one_refused_one_accepted_delivers_to_the_accepted_one(plaintext: Any, closing: list[Delivery]) -> None:
    def rcpt(line: bytes) -> bytes:
        return b"550 5.1.1 unknown\r\n" if b"carol" in line else b"250 2.1.5 OK\r\n"

    async with Endpoint(answer_all(rcpt)) as ep:
        d, tenant = plaintext(ep.port)
        closing.append(d)
        out = await d.deliver(tenant, "alice@contoso.com", ["bob@example.net", "carol@example.net"], BODY, crlf=True)
        assert out.accepted == ("bob@example.net",) and list(out.refused) == ["carol@example.net"]
        assert ep.sessions[0].content is not None and ep.sessions[0].content.endswith(b"\r\n.\r\n")


async def test_mail_refused_and_data_refused(plaintext: Any, closing: list[Delivery]) -> None:
    async with Endpoint(answer_all(mail=b"550 5.7.1 sender refused\r\n",
                                   rcpt=lambda _l: b"503 5.5.1 need MAIL\r\n",
                                   data=b"503 5.5.1 need RCPT\r\n")) as ep:
        d, tenant = plaintext(ep.port)
        closing.append(d)
        with pytest.raises(PermanentError) as e:
            await d.deliver(tenant, "alice@contoso.com", ["bob@example.net"], BODY, crlf=True)
        assert e.value.reply.code == 550 and "MAIL" in e.value.detail
    async with Endpoint(answer_all(data=b"451 4.3.0 not now\r\n")) as ep:
        d, tenant = plaintext(ep.port)
        closing.append(d)
        with pytest.raises(TransientError) as t:
            await d.deliver(tenant, "alice@contoso.com", ["bob@example.net"], BODY, crlf=True)
        assert t.value.reply.code == 451 and "DATA" in t.value.detail
        assert ep.sessions[0].content is None


@pytest.mark.parametrize("goodbye", [[b"421 4.3.2 shutting down\r\n"], None], ids=["421-then-close", "silent-close"])
async def test_a_pooled_connection_the_endpoint_is_closing_is_retried_on_a_new_one(
        plaintext: Any, closing: list[Delivery], goodbye: list[bytes] | None) -> None:
    """The second message finds the pooled connection closing (a 421 to MAIL, the rest of the
    group never answered; or closed without a word): it goes out on a new connection."""
    def script(lines: list[bytes], index: int) -> list[bytes] | None:
        if index == 0 and len([c for c in ep.sessions[0].commands if c.startswith(b"MAIL")]) > 1:
            return goodbye
        return answer_all()(lines, index)

    async with Endpoint(script) as ep:
        d, tenant = plaintext(ep.port)
        closing.append(d)
        await d.deliver(tenant, "alice@contoso.com", ["bob@example.net"], BODY, crlf=True)
        out = await d.deliver(tenant, "alice@contoso.com", ["bob@example.net"], BODY, crlf=True)
        assert not out.reused and out.accepted == ("bob@example.net",) and len(ep.sessions) == 2
        assert ep.sessions[1].content is not None


async def test_a_421_ends_the_wait_for_the_rest_of_the_group(plaintext: Any, closing: list[Delivery]) -> None:
    """RFC 5321 §3.8: 421 means the endpoint is closing; even one that keeps the socket open gets
    no further wait for the RCPT and DATA replies that will never come."""
    async with Endpoint(lambda _l, _i: [b"421 4.3.2 System not accepting network messages\r\n"],
                        close_on_421=False) as ep:
        d, tenant = plaintext(ep.port, command_timeout=5.0)
        closing.append(d)
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(TransientError) as e:
            await d.deliver(tenant, "alice@contoso.com", ["bob@example.net"], BODY, crlf=True)
        assert e.value.reply.code == 451 and "421" in e.value.detail  # a downstream 421 is our 451
        assert asyncio.get_running_loop().time() - t0 < 2.5


async def test_no_reply_to_the_group_is_a_timeout_and_the_connection_is_dropped(
        plaintext: Any, closing: list[Delivery]) -> None:
    def script(_lines: list[bytes], _index: int) -> list[bytes]:
        return [b"250 2.1.0 Sender OK\r\n"]  # MAIL only; RCPT and DATA never answered

    async with Endpoint(script) as ep:
        d, tenant = plaintext(ep.port, command_timeout=0.5)
        closing.append(d)
        with pytest.raises(TransientError) as e:
            await d.deliver(tenant, "alice@contoso.com", ["bob@example.net"], BODY, crlf=True)
        assert e.value.reply.code == 451 and "timeout" in e.value.detail
        assert not d._pool.get((tenant.name, "127.0.0.1", ep.port))


@pytest.mark.parametrize("extra", [b"250 2.0.0 and one more\r\n", b"garbage\r\n"])
async def test_a_reply_out_of_turn_or_malformed_drops_the_connection(
        plaintext: Any, closing: list[Delivery], extra: bytes) -> None:
    def script(lines: list[bytes], index: int) -> list[bytes]:
        out = answer_all()(lines, index) or []
        if not lines[-1].startswith(b"DATA"):
            return out
        return [*out, extra] if extra.startswith(b"250") else [*out[:-1], extra]

    async with Endpoint(script, coalesce=True) as ep:
        d, tenant = plaintext(ep.port)
        closing.append(d)
        with pytest.raises(TransientError):
            await d.deliver(tenant, "alice@contoso.com", ["bob@example.net"], BODY, crlf=True)
        assert not d._pool.get((tenant.name, "127.0.0.1", ep.port))
        for _ in range(100):
            if ep.sessions[0].closed_by_client:
                break
            await asyncio.sleep(0.02)
        assert ep.sessions[0].closed_by_client and not ep.sessions[0].content_started


async def test_content_that_is_not_crlf_clean_goes_the_sequential_way(plaintext: Any, closing: list[Delivery]) -> None:
    """Only CRLF-clean content is pipelined (its DATA is then answered before the relay knows how
    the content goes out); anything else takes aiosmtplib's own DATA path, one command at a time."""
    async with Endpoint(answer_all()) as ep:
        d, tenant = plaintext(ep.port)
        closing.append(d)
        await d.deliver(tenant, "alice@contoso.com", ["bob@example.net"], b"Subject: x\n\nbare LF\n")
        assert _verbs(ep.sessions[0].first_chunk) == [b"MAIL"]


async def test_commands_with_control_characters_are_refused_before_anything_is_written() -> None:
    with pytest.raises(ValueError):
        await client.command_group(aiosmtplib.SMTP(), [b"RCPT TO:<a\rb@example.net>\r\n"], 1)


REPLIES = [b"250 2.1.0 Sender OK\r\n", b"250-first\r\n250-second\r\n250 2.1.5 third\r\n",
           b"550 5.1.1 refused\r\n", b"354 Start mail input\r\n"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(b"".join(REPLIES))), max_size=12))
def test_replies_are_the_same_however_they_are_cut(cuts: list[int]) -> None:
    """The collector's answer does not depend on where TCP splits the stream (property)."""
    stream = b"".join(REPLIES)
    points = sorted({0, *cuts, len(stream)})

    async def run() -> list[tuple[int, str]]:
        proto = SMTPProtocol(loop=asyncio.get_running_loop())
        r = _Replies(proto, len(REPLIES))
        for a, b in itertools.pairwise(points):
            r.data_received(stream[a:b])
        assert r.failed is None
        return [(x.code, x.message) for x in r.got]

    got = asyncio.run(run())
    assert got == [(250, "2.1.0 Sender OK"), (250, "first\nsecond\n2.1.5 third"), (550, "5.1.1 refused"),
                   (354, "Start mail input")]


async def test_the_dev_sink_advertises_pipelining_and_the_relay_uses_it_over_starttls(
        stack: Any, deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exchange Online's inbound connector advertises PIPELINING (its EHLO: SIZE 157286400,
    PIPELINING, DSN, ENHANCEDSTATUSCODES, STARTTLS, 8BITMIME, BINARYMIME, CHUNKING, SMTPUTF8); so
    does its stand-in, and the relay's delivery to it (STARTTLS, client certificate) is pipelined."""
    groups: list[list[bytes]] = []
    real = client.command_group

    async def spy(smtp: aiosmtplib.SMTP, lines: Sequence[bytes], t: float) -> list[Any]:
        groups.append(list(lines))
        return await real(smtp, lines, t)

    monkeypatch.setattr(client, "command_group", spy)
    code, _ = await send(stack, message())
    assert code == 250
    assert [g[0][:4] for g in groups] == [b"MAIL"] and groups[0][-1] == b"DATA\r\n"
    assert len(deployment.delivered()) == 1


# --- inbound: Exchange Online pipelining to the relay ------------------------------------------


async def test_the_relay_advertises_pipelining_and_answers_each_group_in_order(
        stack: Any, deployment: Deployment) -> None:
    """Exchange Online pipelines when the smart host advertises PIPELINING (RFC 2920). One group
    per message, the second one sent right after the first message's final dot: each reply comes
    in order, a refused recipient does not disturb the others, and each message arrives once."""
    c = await Raw.open(deployment.relay_port)
    assert (await c.reply()).startswith("220")
    assert "250-PIPELINING" in (await c.cmd(b"EHLO exo.test")).splitlines()
    assert (await c.cmd(b"STARTTLS")).startswith("220")
    await c.starttls(client_ctx(stack))
    assert "250-PIPELINING" in (await c.cmd(b"EHLO exo.test")).splitlines()
    await c.send(b"MAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob@example.net>\r\n"
                 b"RCPT TO:<dave@example.net> FOO=BAR\r\nDATA\r\n")
    got = [await c.reply() for _ in range(4)]
    assert [g[:1] for g in got] == ["2", "2", "5", "3"], got
    first = message(to="bob@example.net")
    await c.send(first + b".\r\nMAIL FROM:<alice@contoso.com>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\n")
    got = [await c.reply() for _ in range(4)]
    assert [g[:3] for g in got] == ["250", "250", "250", "354"], got
    second = message(to="carol@example.net")
    await c.send(second + b".\r\nQUIT\r\n")
    assert (await c.reply()).startswith("250") and (await c.reply()).startswith("221")
    c.close()
    delivered = deployment.delivered()
    assert len(delivered) == 2
    assert sum(b"To: <bob@example.net>" in m for m in delivered) == 1
    assert sum(b"To: <carol@example.net>" in m for m in delivered) == 1
