"""Issue #12: `signature-relay queue list|show|retry|hold|release|delete|stats`, human and --json,
used while the relay runs — and the running relay notices each change (its spool rescan)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable

import pytest

from relay import cli
from relay.sink import SinkBehavior
from tests.protocol.conftest import Stack
from tests.protocol.test_queue import queue_mode, until
from tests.protocol.test_relay_protocol import send
from tests.support import Deployment, message

MakeStack = Callable[..., Awaitable[Stack]]


def queue(dep: Deployment, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.main(["queue", *args, "-c", str(dep.config_path)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def listed(dep: Deployment, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    rc, out, _ = queue(dep, capsys, "list", "--json")
    assert rc == 0
    items: list[dict[str, object]] = json.loads(out)
    return items


async def test_every_verb_while_the_relay_runs(make_stack: MakeStack, deployment: Deployment,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    queue_mode(deployment)
    # retries are 30 s apart: anything delivered sooner was the operator's doing
    deployment.config_path.write_text(deployment.config_path.read_text().replace(
        "retry_min = 0.2\nretry_max = 0.4\n", "retry_min = 30\nretry_max = 60\nrescan_interval = 0.2\n"))
    st = await make_stack(SinkBehavior(defer_rcpt=re.compile("@example.net")))
    for subject in ("one", "two"):
        raw = message().replace(b"Subject: Lunch", f"Subject: {subject}".encode())
        assert (await send(st, raw))[0] == 250
    await until(lambda: all(i["attempts"] == 1 for i in listed(deployment, capsys)))
    first, second = sorted(listed(deployment, capsys), key=lambda i: str(i["id"]))
    assert first["state"] == "queued" and "4.2.1" in str(first["last_error"])

    rc, out, _ = queue(deployment, capsys, "list")
    assert rc == 0 and "2 cop(ies)" in out and "contoso / <alice@contoso.com> → bob@example.net" in out
    rc, out, _ = queue(deployment, capsys, "show", str(first["id"]))
    assert rc == 0 and "attempts:     1" in out and "Subject:" in out

    def subject_of(item: dict[str, object]) -> bytes:
        _, out, _ = queue(deployment, capsys, "show", str(item["id"]), "--json")
        return f"Subject: {dict(json.loads(out)['headers'])['Subject']}".encode()

    held_subject, other_subject = subject_of(first), subject_of(second)
    assert {held_subject, other_subject} == {b"Subject: one", b"Subject: two"}

    rc, out, _ = queue(deployment, capsys, "hold", str(first["id"]))
    assert rc == 0 and out.startswith("hold: 1 cop(ies)")
    rc, out, _ = queue(deployment, capsys, "stats", "--json")
    stats = json.loads(out)
    assert (stats["queued"], stats["held"], stats["by_tenant"]) == (1, 1, {"contoso": 1})

    assert st.sink is not None
    st.sink.handler.behavior = SinkBehavior()  # the endpoint takes mail again
    rc, out, _ = queue(deployment, capsys, "retry", "--all")
    assert rc == 0 and str(second["id"]) in out
    await until(lambda: len(st.deployment.delivered()) == 1, seconds=5)  # long before the 30 s retry
    assert other_subject in st.deployment.delivered()[0]
    await asyncio.sleep(0.5)
    assert len(st.deployment.delivered()) == 1  # the held one stays held

    rc, _, _ = queue(deployment, capsys, "release", str(first["id"]))
    assert rc == 0
    await until(lambda: len(st.deployment.delivered()) == 2, seconds=5)
    assert held_subject in st.deployment.delivered()[1]
    await until(lambda: listed(deployment, capsys) == [])

    # delete: the running relay forgets it and never delivers it
    st.sink.handler.behavior = SinkBehavior(defer_rcpt=re.compile("@example.net"))
    assert (await send(st, message()))[0] == 250
    await until(lambda: [i["attempts"] for i in listed(deployment, capsys)] == [1])
    [third] = listed(deployment, capsys)
    rc, out, _ = queue(deployment, capsys, "delete", str(third["id"]), "--json")
    assert rc == 0 and json.loads(out) == {"action": "delete", "ids": [third["id"]]}
    await asyncio.sleep(0.5)  # a rescan or two
    assert len(st.relay.runner) == 0 and listed(deployment, capsys) == []
    st.sink.handler.behavior = SinkBehavior()
    rc, _, _ = queue(deployment, capsys, "retry", "--all")
    await asyncio.sleep(0.5)
    assert len(st.deployment.delivered()) == 2


def test_unknown_id_and_missing_argument_are_clear_errors(deployment: Deployment,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    queue_mode(deployment)
    rc, _, err = queue(deployment, capsys, "show", "NOPE-0")
    assert rc == 1 and "no copy NOPE-0" in err and "queue list" in err
    rc, _, err = queue(deployment, capsys, "retry")
    assert rc == 2 and "give an ID or --all" in err
    rc, out, _ = queue(deployment, capsys, "list")
    assert rc == 0 and out.strip() == "spool is empty"
