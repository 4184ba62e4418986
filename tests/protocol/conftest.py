from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest

from relay.config import Config
from relay.delivery.client import Delivery, Outcome
from relay.service import Relay
from relay.sink import Sink, SinkBehavior
from tests.support import Deployment


class RecordingDelivery(Delivery):
    """The real Delivery, remembering outcomes so tests can see connection reuse."""

    outcomes: list[Outcome]

    async def deliver(self, *a: object, **kw: object) -> Outcome:
        out = await super().deliver(*a, **kw)  # type: ignore[arg-type]
        self.outcomes.append(out)
        return out


@dataclass
class Stack:
    deployment: Deployment
    cfg: Config
    relay: Relay
    sink: Sink | None
    delivery: RecordingDelivery

    def client_tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cfg.certs.ca_cert))
        return ctx

    def client(self, **kw: object) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(hostname="127.0.0.1", port=self.deployment.relay_port, start_tls=False,
                               tls_context=self.client_tls(), local_hostname="mail-x.outbound.protection.outlook.com",
                               timeout=30, **kw)  # type: ignore[arg-type]

    async def tls_client(self) -> aiosmtplib.SMTP:
        c = self.client()
        await c.connect()
        await c.starttls(server_hostname="smtp.signature-relay.test")
        await c.ehlo()
        return c

    async def stop_sink(self) -> None:
        if self.sink:
            await self.sink.stop()
            assert self.sink.server is not None
            await self.sink.server.wait_closed()
            self.sink = None


StackFactory = Callable[..., "AsyncIterator[Stack]"]


@pytest.fixture
async def make_stack(deployment: Deployment) -> AsyncIterator[Callable[..., object]]:
    started: list[Stack] = []

    async def factory(behavior: SinkBehavior | None = None, with_sink: bool = True,
                      cfg: Config | None = None) -> Stack:
        cfg = cfg or deployment.load()
        sink = Sink(cfg, behavior) if with_sink else None
        if sink:
            await sink.start()
        delivery = RecordingDelivery(cfg.delivery, cfg.tenants, local_hostname=cfg.hostname)
        delivery.outcomes = []
        relay = Relay(cfg, delivery)
        await relay.start()
        st = Stack(deployment, cfg, relay, sink, delivery)
        started.append(st)
        return st

    yield factory
    for st in started:
        await st.relay.stop(grace=1)
        await st.stop_sink()


@pytest.fixture
async def stack(make_stack: Callable[..., object]) -> Stack:
    st = await make_stack()  # type: ignore[misc]
    assert isinstance(st, Stack)
    return st


def journal(dep: Deployment) -> list[dict[str, object]]:
    import json

    p: Path = dep.maildir.parent / "deliveries.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
