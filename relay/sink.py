"""A local stand-in for a tenant's Exchange Online *inbound connector*, for dev and tests.

Behaves like the real one where it matters to the relay: STARTTLS required; a client
certificate required and its name checked against the tenants' certificate names (the inbound
connector's ``TlsSenderCertificateName``); 250 only once the message is on disk (Maildir:
written to ``tmp/``, fsync'd, renamed into ``new/``, directory fsync'd). Each delivery is also
recorded as one JSON line in ``deliveries.jsonl`` next to the Maildir (envelope, certificate
name, TLS version), so tests can check what arrived without touching the message bytes.

Fault injection for tests and demos: refuse or defer recipients matching a pattern, or answer
DATA with a given reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.config import Config, Listener, TlsConfig
from relay.smtp import tls
from relay.smtp.server import Ehlo, Guard, RelaySMTP, start_listener

log = logging.getLogger("relay.sink")


@dataclass(frozen=True)
class SinkBehavior:
    reject_rcpt: re.Pattern[str] | None = None  # 550 5.1.1 for matching recipients
    defer_rcpt: re.Pattern[str] | None = None  # 450 4.2.1 for matching recipients
    data_reply: str | None = None  # e.g. "451 4.3.0 try later": answer DATA with this
    data_delay: float = 0.0  # seconds to wait before answering DATA (slow-endpoint tests)


class Maildir:
    """Minimal Maildir writer (the delivery half of https://cr.yp.to/proto/maildir.html)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._n = 0

    def deliver(self, data: bytes) -> Path:
        self._n += 1
        name = f"{time.time_ns()}.P{os.getpid()}Q{self._n}.{socket.gethostname()}"
        tmp = self.root / "tmp" / name
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        final = self.root / "new" / name
        os.rename(tmp, final)
        dfd = os.open(self.root / "new", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return final


class SinkHandler(Ehlo):
    def __init__(self, maildir: Path, allowed: dict[str, str], behavior: SinkBehavior) -> None:
        self.maildir = Maildir(maildir)
        self.journal = maildir.parent / "deliveries.jsonl"
        self.allowed = allowed  # certificate name -> tenant name
        self.behavior = behavior

    def _tenant(self, session: Session) -> tuple[str | None, str]:
        names = tls.peer_names((session.ssl or {}).get("peercert"))
        if not names:
            return None, "530 5.7.0 Client certificate required by the inbound connector"
        for n in names:
            if n.lower() in self.allowed:
                return self.allowed[n.lower()], n
        return None, f"550 5.7.1 Certificate name {names[0][:80]} matches no inbound connector"

    async def handle_MAIL(
        self, _server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str],
    ) -> str:
        tenant, why = self._tenant(session)
        if tenant is None:
            log.warning("sink refused MAIL from %s: %s", session.peer, why)
            return why
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, _server: SMTP, _session: Session, envelope: Envelope, address: str, options: list[str],
    ) -> str:
        b = self.behavior
        if b.reject_rcpt and b.reject_rcpt.search(address):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if b.defer_rcpt and b.defer_rcpt.search(address):
            return f"450 4.2.1 <{address}>: Mailbox temporarily unavailable"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, _server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.behavior.data_delay:
            await asyncio.sleep(self.behavior.data_delay)
        if self.behavior.data_reply:
            return self.behavior.data_reply
        data = envelope.original_content or b""
        tenant, cert_name = self._tenant(session)
        record: dict[str, object] = {
            "mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos, "tenant": tenant,
            "client_cert": cert_name, "tls": tls.describe(session.ssl), "size": len(data),
        }
        path = await asyncio.to_thread(self._store, data, record)
        log.info("sink stored %s for tenant %s (%d bytes)", path.name, tenant, len(data))
        return f"250 2.6.0 <{path.name}> Queued mail for delivery"


    def _store(self, data: bytes, record: dict[str, object]) -> Path:
        path = self.maildir.deliver(data)
        with open(self.journal, "a", encoding="utf-8") as j:
            j.write(json.dumps({"file": str(path), **record}) + "\n")
        return path


class Sink:
    def __init__(self, cfg: Config, behavior: SinkBehavior | None = None) -> None:
        sc = cfg.sink
        self.cfg = cfg
        self.listener = Listener(sc.host, sc.port)
        self.tls_context = tls.server_context(
            TlsConfig(sc.cert, sc.key, None), client_ca=sc.client_ca, where=f"{cfg.source}: [sink]")
        allowed = {t.certificate_name.lower(): t.name for t in cfg.tenants}
        self.handler = SinkHandler(sc.maildir, allowed, behavior or SinkBehavior())
        self.server: asyncio.Server | None = None

    def smtp_factory(self) -> SMTP:
        # Long lines are accepted as Exchange Online accepts them (the relay never re-wraps them).
        return RelaySMTP(
            self.handler, hostname="sink.mail.protection.outlook.test", idle_timeout=300,
            data_size_limit=157_286_400, tls_context=self.tls_context, require_starttls=True,
            guard=Guard(max_line_length=self.cfg.security.max_line_length),
        )

    def reload(self, cfg: Config) -> None:
        """Accept the certificates of tenants added since start (config reload)."""
        self.handler.allowed = {t.certificate_name.lower(): t.name for t in cfg.tenants}

    async def start(self) -> None:
        self.server = await start_listener(self.smtp_factory, self.listener, self.tls_context, Guard())
        log.info("tenant-inbound sink listening on %s:%s, Maildir %s",
                 self.listener.host, self.listener.port, self.cfg.sink.maildir)

    async def stop(self) -> None:
        if self.server:
            self.server.close()
