"""Issue #12: nothing after the tenant's 250 turns into a non-250; the queue contains its own
failures (reschedule, hold/, quarantine/, periodic rescan); a full spool answers 452; DSNs say
truthfully who got the message. Real relay, real sink, real sockets; faults are injected only
where this machine cannot produce them (an EIO on one metadata write)."""

from __future__ import annotations

import asyncio
import errno
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosmtplib
import pytest

from relay.delivery.spool import Entry, Spool
from relay.sink import Sink, SinkBehavior
from tests.protocol.conftest import Stack, journal
from tests.protocol.test_queue import queue_mode, spooled, until
from tests.protocol.test_relay_protocol import send
from tests.support import Deployment, message

MakeStack = Callable[..., Awaitable[Stack]]


def set_delivery(dep: Deployment, lines: str) -> None:
    dep.config_path.write_text(dep.config_path.read_text().replace("[delivery]\n", f"[delivery]\n{lines}\n"))


# --- nothing after the tenant's 250 may turn into a non-250 ------------------------------------

async def test_inline_dsn_to_a_non_ascii_sender_keeps_the_250(make_stack: MakeStack) -> None:
    """The DSN goes out with SMTPUTF8; before #12 the encoding error became a 451 and Exchange
    Online sent the accepted message again (a duplicate)."""
    st = await make_stack(SinkBehavior(reject_rcpt=re.compile("gone@")))
    sender = "jörg@contoso.com"
    code, text = await send(st, message(frm=sender), sender, ("gone@example.net", "ok@example.net"), smtputf8=True)
    assert code == 250, text
    await until(lambda: len(journal(st.deployment)) == 2)
    msg, dsn = journal(st.deployment)
    assert msg["rcpt_tos"] == ["ok@example.net"]  # delivered once
    assert dsn["mail_from"] == "<>" and dsn["rcpt_tos"] == [sender]
    body = st.deployment.delivered()[1]
    assert f"To: <{sender}>".encode() in body and b"Final-Recipient: rfc822; gone@example.net" in body
    assert b"It was delivered to 1 other recipient(s)." in body
    await asyncio.sleep(0.3)
    assert len(journal(st.deployment)) == 2  # and nothing more


async def test_inline_dsn_that_cannot_be_sent_is_spooled_not_lost(make_stack: MakeStack,
                                                                  deployment: Deployment) -> None:
    # The endpoint defers mail to the sender (so the DSN) and refuses gone@ for good.
    set_delivery(deployment, "retry_min = 0.3\nretry_max = 0.3")
    st = await make_stack(SinkBehavior(reject_rcpt=re.compile("gone@"), defer_rcpt=re.compile("alice@")))
    code, _ = await send(st, message(), rcpts=("gone@example.net", "ok@example.net"))
    assert code == 250  # the tenant has the message: the DSN's fate does not change that
    names = spooled(deployment)
    assert any(n.endswith("-dsn.json") for n in names), names
    assert [r["rcpt_tos"] for r in journal(st.deployment)] == [["ok@example.net"]]
    # the endpoint recovers: the spooled DSN is delivered by the runner, once
    assert st.sink is not None
    st.sink.handler.behavior = SinkBehavior()
    await until(lambda: len(journal(st.deployment)) == 2)
    assert journal(st.deployment)[1]["rcpt_tos"] == ["alice@contoso.com"]
    await until(lambda: spooled(deployment) == [])


# --- the queue contains its own failures -------------------------------------------------------

async def test_metadata_write_failure_reschedules_then_holds(make_stack: MakeStack, deployment: Deployment,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    queue_mode(deployment)
    st = await make_stack(SinkBehavior(defer_rcpt=re.compile("later@")))
    spool = st.relay.runner.spool

    def eio(_e: Entry) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool, "update", eio)  # every "deferred, next attempt at…" write fails
    assert (await send(st, message(), rcpts=("later@example.net",)))[0] == 250
    held = deployment.root / "var" / "spool" / "hold"
    await until(lambda: held.exists() and any(held.glob("*.json")), seconds=15)
    names = sorted(p.suffix for p in held.iterdir())
    assert names == [".eml", ".json", ".reason"]
    reason = next(held.glob("*.reason")).read_text()
    assert "3 unexpected failures" in reason and "Input/output error" in reason
    assert not any(p.suffix == ".json" for p in (deployment.root / "var" / "spool").iterdir())
    assert b"signature_relay_held 1.0" in st.relay.metrics.render()
    assert len(st.relay.runner) == 0


async def test_periodic_rescan_picks_up_what_memory_does_not_know(make_stack: MakeStack,
                                                                 deployment: Deployment) -> None:
    queue_mode(deployment)
    set_delivery(deployment, "rescan_interval = 0.2")
    st = await make_stack()
    # A committed entry appears that this process never scheduled (written by another one).
    raw = message()
    Spool(deployment.root / "var" / "spool").put(
        Entry(id="STRAY-0", tenant="contoso", mail_from="alice@contoso.com", rcpts=["bob@example.net"],
              smtputf8=False, created=0.0, next_attempt=0.0), raw)
    await until(lambda: len(st.deployment.delivered()) == 1)
    assert st.deployment.delivered()[0] == raw  # delivered as spooled
    await until(lambda: spooled(deployment) == [])


async def test_an_entry_is_never_attempted_twice_at_once(make_stack: MakeStack, deployment: Deployment) -> None:
    """A rescan during a slow delivery must not start a second delivery of the same entry."""
    queue_mode(deployment)
    st = await make_stack(SinkBehavior(data_delay=1.0))
    assert (await send(st, message()))[0] == 250
    await asyncio.sleep(0.3)  # the delivery is in DATA now
    for _ in range(3):
        assert await st.relay.runner.rescan() == 0
    await until(lambda: len(st.deployment.delivered()) == 1)
    await asyncio.sleep(0.5)
    assert len(st.deployment.delivered()) == 1


# --- full disk, truthful DSNs ------------------------------------------------------------------

async def test_below_min_free_space_is_452_and_nothing_kept(make_stack: MakeStack, deployment: Deployment) -> None:
    queue_mode(deployment)
    set_delivery(deployment, f"min_free_space = {2**50}")  # more than any disk here has free
    st = await make_stack()
    code, text = await send(st, message())
    assert (code, text) == (452, "4.3.1 Insufficient system storage, try again later")
    assert [n for n in spooled(deployment) if not n.startswith(".")] == []
    assert st.deployment.delivered() == []


async def test_expiry_dsn_does_not_claim_a_delivery(make_stack: MakeStack, deployment: Deployment) -> None:
    queue_mode(deployment, lifetime=1.0)
    st = await make_stack(SinkBehavior(defer_rcpt=re.compile("@example.net")))
    assert (await send(st, message(), rcpts=("later@example.net",)))[0] == 250
    await until(lambda: len(journal(st.deployment)) == 1, seconds=15)
    dsn = st.deployment.delivered()[0]
    assert b"It was not delivered to any recipient." in dsn and b"delivered to the others" not in dsn


def test_quarantined_files_are_never_deleted_at_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (tmp_path / "A-0.json").write_text(json.dumps({"id": "B-0"}))  # an id that is not its file name
    (tmp_path / "A-0.eml").write_bytes(b"x")
    (tmp_path / "C-0.json").write_text(json.dumps({"id": "C-0", "tenant": "t", "mail_from": "", "rcpts": [],
                                                   "smtputf8": False, "created": 0, "next_attempt": 0}))
    assert spool.prepare() == []  # C-0 has no message file: set aside, not scheduled
    assert sorted(p.name for p in (tmp_path / "quarantine").iterdir()) == [
        "A-0.eml", "A-0.json", "A-0.reason", "C-0.json", "C-0.reason"]
    assert spool.prepare() == [] and len(list((tmp_path / "quarantine").iterdir())) == 5


async def test_copy_deferred_after_another_was_delivered_is_spooled_not_451(make_stack: MakeStack,
                                                                           deployment: Deployment) -> None:
    """Per-rule copies: a 4xx for the second after the first was delivered used to answer 451, so
    Exchange Online re-sent the whole message and the first recipients got it twice."""
    from tests.protocol.test_relay_protocol import external_internal_rules

    external_internal_rules(deployment)
    set_delivery(deployment, "retry_min = 0.3\nretry_max = 0.3")
    st = await make_stack(SinkBehavior(defer_rcpt=re.compile("bob@contoso")))
    code, text = await send(st, message(), rcpts=("a@example.net", "bob@contoso.com"))
    assert code == 250, text
    assert [r["rcpt_tos"] for r in journal(st.deployment)] == [["a@example.net"]]
    assert any(n.endswith("-1.json") for n in spooled(deployment))  # the internal copy waits in the spool
    assert st.sink is not None
    st.sink.handler.behavior = SinkBehavior()  # the endpoint takes it now
    await until(lambda: len(journal(st.deployment)) == 2)
    assert journal(st.deployment)[1]["rcpt_tos"] == ["bob@contoso.com"]
    assert b"INTERNAL SIGNATURE" in st.deployment.delivered()[1]
    await until(lambda: spooled(deployment) == [])
    assert [r["rcpt_tos"] for r in journal(st.deployment)] == [["a@example.net"], ["bob@contoso.com"]]  # once each


# --- graceful stop -----------------------------------------------------------------------------

async def test_sigterm_drain_421s_new_sessions_and_finishes_the_message_in_flight(make_stack: MakeStack) -> None:
    st = await make_stack(SinkBehavior(data_delay=1.0))
    idle = await st.tls_client()  # a session that has not started a transaction yet
    in_flight = asyncio.create_task(send(st, message()))
    await asyncio.sleep(0.4)  # the message is with the (slow) tenant endpoint now
    stopping = asyncio.create_task(st.relay.stop(grace=10))
    await asyncio.sleep(0.1)
    c = st.client()
    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
        await c.connect()
    assert refused.value.code == 421 and "4.3.2" in refused.value.message
    r = await idle.execute_command(b"MAIL", b"FROM:<alice@contoso.com>")
    assert r.code == 421  # no new transaction on an open session either
    idle.close()
    assert (await in_flight)[0] == 250  # the message in flight finished
    await stopping
    assert len(st.deployment.delivered()) == 1
    with pytest.raises(OSError):
        await st.client().connect()  # and then the listener is closed


# --- inline-then-queue, per tenant ---------------------------------------------------------------

async def test_inline_then_queue_spools_only_when_the_endpoint_is_down(make_stack: MakeStack,
                                                                      deployment: Deployment) -> None:
    """The service stays inline; contoso's tenant file chooses inline-then-queue."""
    f = deployment.root / "rules" / "contoso" / "tenant.toml"
    f.write_text(f.read_text().replace("[inbound]\n", '[inbound]\ndelivery_mode = "inline-then-queue"\n'))
    set_delivery(deployment, "retry_min = 0.3\nretry_max = 0.3")
    st = await make_stack(with_sink=False)  # the tenant endpoint is down
    code, text = await send(st, message())
    assert code == 250 and text.endswith("queued"), text  # spooled, not 451, while it is down
    assert any(n.endswith(".json") for n in spooled(deployment))
    st.sink = Sink(st.cfg)
    await st.sink.start()
    await until(lambda: len(st.deployment.delivered()) == 1)
    await until(lambda: spooled(deployment) == [])
    code, text = await send(st, message())
    assert (code, text.split()[-4:]) == (250, ["accepted", "by", "tenant", "endpoint"])  # inline while it is up
    assert spooled(deployment) == []
    await asyncio.sleep(0.4)
    assert len(st.deployment.delivered()) == 2  # once each
    # a permanent refusal is still the endpoint's own 5xx, never queued
    assert st.sink is not None
    st.sink.handler.behavior = SinkBehavior(reject_rcpt=re.compile("gone@"))
    code, _ = await send(st, message(), rcpts=("gone@example.net",))
    assert code == 550 and spooled(deployment) == []


async def test_partial_refusal_is_never_resent_after_a_restart(make_stack: MakeStack, deployment: Deployment) -> None:
    """Per-recipient outcome: the accepted recipient gets the message once, the refused one gets a
    DSN that says the other was delivered, and a restart re-sends nothing. (A recipient deferred
    at RCPT means no DATA to anyone, so an entry is never half delivered: see the README.)"""
    queue_mode(deployment)
    st = await make_stack(SinkBehavior(reject_rcpt=re.compile("gone@")))
    assert (await send(st, message(), rcpts=("gone@example.net", "ok@example.net")))[0] == 250
    await until(lambda: len(journal(st.deployment)) == 2 and spooled(deployment) == [])
    assert [r["rcpt_tos"] for r in journal(st.deployment)] == [["ok@example.net"], ["alice@contoso.com"]]
    assert b"It was delivered to 1 other recipient(s)." in st.deployment.delivered()[1]
    await st.relay.stop(grace=1)
    await make_stack(with_sink=False)  # same spool; the first stack's sink still runs
    await asyncio.sleep(0.6)
    assert len(journal(st.deployment)) == 2


async def test_a_copy_held_before_the_rescan_noticed_is_just_dropped(make_stack: MakeStack, deployment: Deployment,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from relay.delivery import admin

    queue_mode(deployment)
    set_delivery(deployment, "rescan_interval = 60")  # the runner learns of the hold only at its next attempt
    st = await make_stack(SinkBehavior(defer_rcpt=re.compile("@example.net")))
    assert (await send(st, message()))[0] == 250
    spool = st.relay.runner.spool
    await until(lambda: [i.entry.attempts for i in admin.items(spool)] == [1])
    [item] = admin.items(spool)
    admin.hold(spool, item.entry.id)
    await until(lambda: len(st.relay.runner) == 0, seconds=3)  # the next attempt (0.2-0.4 s) finds it gone
    assert "unexpected failure" not in caplog.text
    [held] = admin.items(spool)
    assert held.state == "held" and held.reason == "held by an operator"


async def test_a_dsn_refused_for_good_is_not_spooled(make_stack: MakeStack, deployment: Deployment,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    st = await make_stack(SinkBehavior(reject_rcpt=re.compile("gone@|alice@")))
    assert (await send(st, message(), rcpts=("gone@example.net", "ok@example.net")))[0] == 250
    await until(lambda: "dsn=refused" in caplog.text)
    assert spooled(deployment) == []  # retrying a DSN the endpoint refused for good cannot help
    assert "DSN for" in caplog.text and "refused" in caplog.text and "dsn=refused" in caplog.text


def test_a_release_in_progress_at_start_is_not_mistaken_for_a_crash_leftover(tmp_path: Path) -> None:
    """`queue release` moves the message back first and the metadata last; a relay starting in
    between must not delete the message as an uncommitted leftover."""
    spool = Spool(tmp_path)
    e = Entry(id="R-0", tenant="t", mail_from="", rcpts=["x@example.net"], smtputf8=False, created=0, next_attempt=0)
    spool.prepare()
    spool.put(e, b"Subject: x\r\n\r\nx\r\n")
    spool.hold(e, "test")
    (tmp_path / "hold" / "R-0.eml").rename(tmp_path / "R-0.eml")  # the release's first step
    assert spool.prepare() == []
    assert (tmp_path / "R-0.eml").exists()
    (tmp_path / "hold" / "R-0.json").rename(tmp_path / "R-0.json")  # its last step
    assert [x.id for x in spool.prepare()] == ["R-0"]
