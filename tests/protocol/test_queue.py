"""Queue mode: 250 once fsync'd in the spool, retries, restart pick-up, bounces, write failures."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Awaitable, Callable

import pytest

from relay.sink import Sink, SinkBehavior
from tests.protocol.conftest import Stack, journal
from tests.protocol.test_relay_protocol import send
from tests.support import CONTOSO_ID, Deployment, message

MakeStack = Callable[..., Awaitable[Stack]]


def queue_mode(dep: Deployment, lifetime: float = 3600) -> None:
    dep.config_path.write_text(dep.config_path.read_text().replace(
        "[delivery]\n", f'[delivery]\nmode = "queue"\nretry_min = 0.2\nretry_max = 0.4\nlifetime = {lifetime}\n'))


async def until(cond: Callable[[], bool], seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


def spooled(dep: Deployment) -> list[str]:
    d = dep.root / "var" / "spool"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


async def test_accepted_while_endpoint_down_then_delivered_once(make_stack: MakeStack, deployment: Deployment) -> None:
    queue_mode(deployment)
    st = await make_stack(with_sink=False)
    code, text = await send(st, message())
    assert code == 250 and text.endswith("queued")
    assert len([n for n in spooled(deployment) if n.endswith(".json")]) == 1  # on disk before the 250
    assert b"signature_relay_queued 1.0" in st.relay.metrics.render()
    await asyncio.sleep(0.5)  # a few attempts fail: the endpoint is down
    oldest = re.search(rb"^signature_relay_queue_oldest_seconds (\S+)", st.relay.metrics.render(), re.M)
    assert oldest and 0.4 < float(oldest.group(1)) < 30  # the copy has waited about half a second
    assert st.deployment.delivered() == []
    st.sink = Sink(st.cfg)
    await st.sink.start()
    await until(lambda: len(st.deployment.delivered()) == 1)
    await until(lambda: spooled(deployment) == [])
    await asyncio.sleep(0.5)
    assert len(st.deployment.delivered()) == 1  # exactly once


async def test_a_restart_delivers_what_the_spool_holds(make_stack: MakeStack, deployment: Deployment) -> None:
    queue_mode(deployment)
    st = await make_stack(with_sink=False)
    assert (await send(st, message()))[0] == 250
    await st.relay.stop(grace=1)  # the relay goes away with mail queued
    # a crash before a 250 leaves an uncommitted copy behind; it must not be delivered
    leftover = deployment.root / "var" / "spool" / "ZZZUNCOMMITTED-0.eml"
    leftover.write_bytes(b"Subject: never acknowledged\r\n\r\nx\r\n")
    st2 = await make_stack()  # new relay, same spool, endpoint up
    await until(lambda: len(st2.deployment.delivered()) == 1)
    await until(lambda: spooled(deployment) == [])
    assert b"never acknowledged" not in st2.deployment.delivered()[0]


async def test_spool_write_failure_is_451_and_nothing_is_kept(make_stack: MakeStack, deployment: Deployment) -> None:
    queue_mode(deployment)
    st = await make_stack()
    spool = deployment.root / "var" / "spool"
    shutil.rmtree(spool)
    spool.write_text("not a directory")  # every write now fails with a real OS error (ENOTDIR)
    code, text = await send(st, message())
    assert (code, text) == (451, "4.3.0 Cannot queue the message now, try again later")
    assert st.deployment.delivered() == []


async def test_refusal_bounces_to_the_sender(make_stack: MakeStack, deployment: Deployment) -> None:
    queue_mode(deployment)
    st = await make_stack(SinkBehavior(reject_rcpt=re.compile("gone@")))
    assert (await send(st, message(), rcpts=("gone@example.net", "ok@example.net")))[0] == 250
    await until(lambda: len(journal(st.deployment)) == 2)
    recs = journal(st.deployment)
    assert recs[0]["rcpt_tos"] == ["ok@example.net"]
    assert recs[1]["rcpt_tos"] == ["alice@contoso.com"] and recs[1]["mail_from"] == "<>"
    assert b"Final-Recipient: rfc822; gone@example.net" in st.deployment.delivered()[1]
    await until(lambda: spooled(deployment) == [])


async def test_expiry_bounces_once_and_never_for_a_null_sender(make_stack: MakeStack, deployment: Deployment) -> None:
    queue_mode(deployment, lifetime=1.0)
    st = await make_stack(SinkBehavior(defer_rcpt=re.compile("@example.net")))
    assert (await send(st, message(), rcpts=("later@example.net",)))[0] == 250
    null = message(extra_headers=f"X-MS-Exchange-CrossTenant-Id: {CONTOSO_ID}\r\n")
    assert (await send(st, null, frm="", rcpts=("later2@example.net",)))[0] == 250
    await until(lambda: len(journal(st.deployment)) == 1 and spooled(deployment) == [], seconds=15)
    [rec] = journal(st.deployment)  # one DSN, for the message that had a sender
    assert rec["rcpt_tos"] == ["alice@contoso.com"] and rec["mail_from"] == "<>"
    dsn = st.deployment.delivered()[0]
    assert b"Status: 4.4.7" in dsn and b"Final-Recipient: rfc822; later@example.net" in dsn
    await asyncio.sleep(0.6)
    assert len(journal(st.deployment)) == 1


@pytest.mark.parametrize("corrupt", [b"{not json", b'{"id": "x"}'])
async def test_corrupt_metadata_is_kept_aside_not_lost(make_stack: MakeStack, deployment: Deployment,
                                                       corrupt: bytes) -> None:
    queue_mode(deployment)
    spool = deployment.root / "var" / "spool"
    spool.mkdir(parents=True)
    (spool / "BROKEN-0.json").write_bytes(corrupt)
    (spool / "BROKEN-0.eml").write_bytes(b"Subject: kept\r\n\r\nx\r\n")
    st = await make_stack()
    assert sorted(p.name for p in spool.iterdir()) == ["quarantine"]
    q = spool / "quarantine"
    assert sorted(p.name for p in q.iterdir()) == ["BROKEN-0.eml", "BROKEN-0.json", "BROKEN-0.reason"]
    assert (q / "BROKEN-0.eml").read_bytes() == b"Subject: kept\r\n\r\nx\r\n"  # kept byte for byte
    assert (q / "BROKEN-0.json").read_bytes() == corrupt
    assert (await send(st, message()))[0] == 250  # the relay runs; nothing crash-loops
