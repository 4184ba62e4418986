"""A finished SMTP session is freed by reference counting, not left for the cyclic collector
(issue #14: every session used to be cyclic garbage, ~30 µs a message of collector passes, and
whatever message it held stayed until a pass). The collector is off while each session runs; the
session object must be gone once its connection is, however it ended."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from relay.smtp import server
from tests.protocol.conftest import Stack
from tests.protocol.rawsmtp import Raw
from tests.protocol.test_security import configure, session, transaction
from tests.support import Deployment, message

MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch, deployment: Deployment) -> Iterator[list[weakref.ref[server.RelaySMTP]]]:
    """Every session of the relay's listener made while the test runs (weak references; the dev
    sink's sessions, on the relay's pooled delivery connections, stay open), with the cyclic
    collector off meanwhile."""
    seen: list[weakref.ref[server.RelaySMTP]] = []
    made = server.RelaySMTP.connection_made

    def connection_made(self: server.RelaySMTP, transport: Any) -> None:
        port = (transport.get_extra_info("sockname") or ("", 0))[1]
        if port == deployment.relay_port and not any(r() is self for r in seen):  # (again after STARTTLS)
            seen.append(weakref.ref(self))
        made(self, transport)

    monkeypatch.setattr(server.RelaySMTP, "connection_made", connection_made)
    gc.collect()
    gc.disable()
    try:
        yield seen
    finally:
        gc.enable()


async def freed(seen: list[weakref.ref[server.RelaySMTP]], want: int) -> None:
    """Every one of ``want`` sessions is gone (its connection closed), without the collector."""
    for _ in range(100):
        if len(seen) >= want and all(r() is None for r in seen):
            return
        await asyncio.sleep(0.05)
    alive = [r() for r in seen if r() is not None]
    pytest.fail(f"{len(alive)} of {len(seen)} sessions still alive: "
                f"{[type(x).__name__ for s in alive for x in gc.get_referrers(s)][:12]}")


@pytest.fixture
async def relay(make_stack: MakeStack) -> AsyncIterator[Stack]:
    yield await make_stack()


async def test_a_session_that_relayed_a_message_and_quit_is_freed(
        relay: Stack, sessions: list[weakref.ref[server.RelaySMTP]]) -> None:
    c = await session(relay)  # STARTTLS, as Exchange Online connects
    replies = await transaction(c, b"<alice@contoso.com>", [b"<bob@example.net>"], message())
    assert replies[-1].startswith("250"), replies
    assert (await c.cmd(b"QUIT")).startswith("221")
    assert await c.closed()
    c.close()
    await freed(sessions, 1)
    assert len(relay.deployment.delivered()) == 1


async def test_a_client_that_goes_away_without_quit_leaves_no_session_behind(
        relay: Stack, sessions: list[weakref.ref[server.RelaySMTP]]) -> None:
    c = await Raw.open(relay.deployment.relay_port)
    assert (await c.reply()).startswith("220")
    assert (await c.cmd(b"EHLO mail-x.outbound.protection.outlook.com")).startswith("250")
    c.close()
    tls = await session(relay)
    assert (await tls.cmd(b"MAIL FROM:<alice@contoso.com>")).startswith("250")
    assert (await tls.cmd(b"RCPT TO:<bob@example.net>")).startswith("250")
    assert (await tls.cmd(b"DATA")).startswith("354")
    await tls.send(b"Subject: cut short\r\n\r\nhalf a")  # then the connection goes, mid-DATA
    tls.close()
    await freed(sessions, 2)
    assert relay.deployment.delivered() == []


async def test_a_session_closed_for_idling_is_freed(
        make_stack: MakeStack, deployment: Deployment, sessions: list[weakref.ref[server.RelaySMTP]]) -> None:
    configure(deployment, listen="idle_timeout = 1")
    st = await make_stack()
    c = await Raw.open(st.deployment.relay_port)
    assert (await c.reply()).startswith("220")
    assert (await c.cmd(b"EHLO mail-x.outbound.protection.outlook.com")).startswith("250")
    assert await c.closed(wait=5)  # the relay hung up on the idle client
    c.close()
    await freed(sessions, 1)
