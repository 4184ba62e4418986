"""The relay service: accept from Exchange Online, bind, process, deliver back, answer.

This is the I/O shell around the pure core (``binding``, ``pipeline``). One message gets one log
line with tenant, message-id, sizes, decision, endpoint reply and latency.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import functools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay import binding, metrics, pipeline, replies
from relay import log as msglog
from relay.config import Config
from relay.delivery import dsn
from relay.delivery.client import Delivery, Outcome
from relay.delivery.queue import QueueRunner
from relay.delivery.spool import Entry, Spool
from relay.delivery.spool import now as spool_now
from relay.errors import PermanentError, RelayError, Reply, TransientError
from relay.mime import trace
from relay.smtp import tls
from relay.smtp.server import EhloWithoutAuth, Guard, RelaySMTP, Slot, start_listener

log = logging.getLogger("relay")
# Above this size the pure pipeline runs in a worker thread so one big message cannot stall
# every other session on the event loop (aiosmtpd #293).
_OFFLOAD_BYTES = 256 * 1024


def new_queue_id() -> str:
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").rstrip("=")


def envelope_sender(env: Envelope) -> str:
    """aiosmtpd keeps the null sender as "<>"; we use ""."""
    s = env.mail_from or ""
    return "" if s == "<>" else s


def _prepare(
    cfg: Config, raw: bytes, mail_from: str, rcpts: list[str], peer: binding.Peer, when: dt.datetime,
    received_for: Callable[[Sequence[str]], bytes], fields: dict[str, Any],
) -> tuple[bytes, binding.Binding, list[pipeline.Copy]]:
    """Ingress → loop check → binding → pipeline, on the one normalised message and its one header
    parse (DESIGN: what we check is what the tenant gets). Pure apart from filling ``fields``."""
    settings = pipeline.Settings.of(cfg)
    inbound = pipeline.accept(raw, settings)
    raw, top = inbound.raw, inbound.top
    mids = top.get("message-id")
    fields["message_id"] = mids[0][:200] if mids else "-"
    if inbound.normalised:
        fields["normalised"] = "line-endings"
    hops = len(top.get("received", ()))
    if hops >= cfg.security.max_received:
        # RFC 5321 §6.3: a loop is detected by counting Received: fields.
        raise PermanentError(replies.LOOP_DETECTED, f"{hops} Received: fields")
    b = binding.bind(cfg, mail_from, raw, peer, top=top)
    fields["tenant"] = b.tenant.name
    fields["bound_by"] = b.how
    copies = pipeline.run(inbound, policy=b.tenant.policy, mail_from=mail_from, recipients=rcpts, at=when,
                          settings=settings, received_for=received_for)
    return raw, b, copies


class RelayHandler(EhloWithoutAuth):
    """aiosmtpd hook object. Replies come from :mod:`relay.replies` only."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str],
    ) -> str:
        sec = self.relay.cfg.security
        if not address.isascii() and not envelope.smtp_utf8:
            # RFC 6531 §3.4: without the SMTPUTF8 parameter the transaction is ASCII; refuse now,
            # not with a 451 after DATA that Exchange Online would retry for a day.
            return str(replies.NEEDS_SMTPUTF8)
        if sec.require_client_cert:
            names = tls.peer_names((session.ssl or {}).get("peercert"))
            if not names:
                return str(replies.CLIENT_CERT_REQUIRED)
            if not any(n.lower() in {c.lower() for c in sec.client_cert_names} for n in names):
                log.warning("refused at MAIL peer=%s: client certificate %s not accepted", session.peer, names[:3])
                return str(replies.NOT_AUTHORIZED)
        try:
            binding.check_sender(self.relay.cfg, "" if address == "<>" else address)
        except RelayError as e:
            log.info("refused at MAIL peer=%s from=<%s>: %s", session.peer, msglog.safe(address), msglog.safe(e.detail))
            return replies.reply_for(e)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return str(replies.OK)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str],
    ) -> str:
        if not address.isascii() and not envelope.smtp_utf8:
            return str(replies.NEEDS_SMTPUTF8)  # RFC 6531 §3.4
        if len(envelope.rcpt_tos) >= self.relay.cfg.security.max_recipients:
            return str(replies.TOO_MANY_RECIPIENTS)  # RFC 5321 §4.5.3.1.10: the earlier ones stand
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return str(replies.OK)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return await self.relay.handle_message(server, session, envelope)

    async def handle_exception(self, error: Exception) -> str:
        return replies.reply_for(error)


class Relay:
    def __init__(self, cfg: Config, delivery: Delivery | None = None) -> None:
        self.cfg = cfg
        sec = cfg.security
        self.tls_context = tls.server_context(cfg.tls, client_ca=sec.client_ca, where=f"{cfg.source}: [tls]")
        self.guard = Guard()
        self.guard.configure(sec)
        self.delivery = delivery or Delivery(cfg.delivery, cfg.tenants, local_hostname=cfg.hostname)
        self.handler = RelayHandler(self)
        self.servers: list[asyncio.Server] = []
        self.queue = (QueueRunner(Spool(cfg.delivery.spool_dir), lambda: self.delivery, lambda: self.cfg)
                      if cfg.delivery.mode == "queue" else None)
        self.metrics = metrics.Metrics(connections=lambda: self.guard.active,
                                       queued=lambda: len(self.queue) if self.queue is not None else 0)
        self._metrics_server: asyncio.Server | None = None
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def smtp_factory(self, implicit_tls: bool = False, slot: Slot | None = None) -> SMTP:
        # On an implicit-TLS listener TLS is already up: no STARTTLS to offer or require.
        return RelaySMTP(
            self.handler, hostname=self.cfg.hostname, idle_timeout=self.cfg.idle_timeout,
            data_size_limit=self.cfg.max_message_size, tls_context=None if implicit_tls else self.tls_context,
            require_starttls=self.cfg.require_starttls and not implicit_tls, guard=self.guard, slot=slot,
        )

    async def start(self) -> None:
        if self.queue is not None:
            await self.queue.start()  # before listening: whatever the spool holds is scheduled first
        for lst in self.cfg.listeners:
            factory = functools.partial(self.smtp_factory, lst.implicit_tls)
            # Implicit-TLS listeners keep the context they started with (asyncio binds it to the
            # server); STARTTLS ones pick up a reloaded certificate for each new session.
            self.servers.append(await start_listener(factory, lst, self.tls_context, self.guard))
            log.info("listening on %s:%s (%s)", lst.host, lst.port, "implicit TLS" if lst.implicit_tls else "STARTTLS")
        if self.cfg.metrics_listen:
            host, port = self.cfg.metrics_listen
            self._metrics_server = await metrics.serve(host, port, self.metrics, self.healthy)

    def reload(self, new: Config) -> None:
        """Take a new configuration without dropping connections (SIGHUP). Everything is built
        first — TLS context, tenants' client certificates — and swapped only if all of it
        succeeded: invalid config is never half-applied (raises ConfigError, old config stays).
        Sessions in progress continue; each new message uses the new tenants, rules and limits."""
        sec = new.security
        tls_context = tls.server_context(new.tls, client_ca=sec.client_ca, where=f"{new.source}: [tls]")
        self.delivery.update(new.delivery, new.tenants)
        if new.listeners != self.cfg.listeners or new.metrics_listen != self.cfg.metrics_listen:
            log.warning("reload: listener addresses changed; that takes a restart (old ones kept)")
        if (new.delivery.mode, new.delivery.spool_dir) != (self.cfg.delivery.mode, self.cfg.delivery.spool_dir):
            log.warning("reload: delivery mode or spool changed; that takes a restart (old ones kept)")
        self.guard.configure(sec)
        self.tls_context = tls_context
        self.cfg = new
        log.info("configuration reloaded: %d tenant(s) [%s]", len(new.tenants), ", ".join(t.name for t in new.tenants))

    def healthy(self) -> bool:
        return bool(self.servers) and all(s.is_serving() for s in self.servers)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let messages in flight finish (up to ``grace`` s), close the pool."""
        for s in self.servers:
            s.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        if self.queue is not None:
            await self.queue.stop()  # spooled mail stays on disk for the next start
        await self.delivery.close()

    def hold_time(self) -> float:
        d = self.cfg.delivery
        return d.connect_timeout + 3 * d.command_timeout + d.data_timeout + 60

    async def handle_message(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.in_flight += 1
        self._idle.clear()
        if isinstance(server, RelaySMTP):
            server.hold_timeout(self.hold_time())
        t0 = time.monotonic()
        qid = new_queue_id()
        raw = envelope.original_content or b""
        mail_from = envelope_sender(envelope)
        rcpts = list(envelope.rcpt_tos)
        fields: dict[str, Any] = {
            "qid": qid, "peer": session.peer[0] if session.peer else None, "from": f"<{mail_from}>",
            "rcpts": len(rcpts), "message_id": "-", "size_in": len(raw),
        }
        try:
            reply = await self._process_and_deliver(session, envelope, qid, raw, mail_from, rcpts, fields)
        except Exception as e:  # the one place errors become replies
            reply = replies.reply_for(e)
            fields["error"] = e.detail if isinstance(e, RelayError) else f"{type(e).__name__}: {e}"
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
        fields["reply"] = reply
        elapsed = time.monotonic() - t0
        fields["latency_ms"] = round(elapsed * 1000, 1)
        self.metrics.latency.observe(elapsed)
        self.metrics.replies.labels(reply[:3]).inc()
        result = "accepted" if reply.startswith("2") else "deferred" if reply.startswith("4") else "refused"
        self.metrics.messages.labels(fields.get("tenant", "-"), result).inc()
        log.info("message %s", msglog.fmt(fields))
        return reply

    async def _process_and_deliver(
        self, session: Session, envelope: Envelope, qid: str, raw: bytes, mail_from: str,
        rcpts: list[str], fields: dict[str, Any],
    ) -> str:
        cfg = self.cfg
        peer = binding.Peer(
            ip=session.peer[0] if session.peer else None,
            cert_names=tuple(tls.peer_names((session.ssl or {}).get("peercert"))),
            sni=tls.sni_of(session.ssl),
        )
        tls_info, when = tls.describe(session.ssl), dt.datetime.now(dt.UTC)

        def received_for(group: Sequence[str]) -> bytes:
            return trace.received(
                helo=session.host_name, peer_ip=session.peer[0] if session.peer else None, by=cfg.hostname,
                queue_id=qid, recipients=group, tls=tls_info, smtputf8=envelope.smtp_utf8, when=when.astimezone())

        work = functools.partial(_prepare, cfg, raw, mail_from, rcpts, peer, when, received_for, fields)
        # Everything proportional to the message's size (normalisation, header parse, MIME work)
        # runs in a worker thread for big messages, so one cannot stall other sessions (aiosmtpd #293).
        raw, b, copies = await asyncio.to_thread(work) if len(raw) > _OFFLOAD_BYTES else work()
        t = b.tenant
        fields["copies"] = len(copies) if len(copies) > 1 else None
        fields["decision"] = ";".join(str(c.processed.decision) for c in copies)
        fields["rules"] = ";".join(c.sections or "-" for c in copies) if any(c.sections for c in copies) else None
        fields["placement"] = ";".join(c.processed.placement for c in copies if c.processed.placement) or None
        fields["placement_unsure"] = ";".join(d for c in copies for d in c.processed.doubts) or None
        fields["anomalies"] = ",".join(sorted({a for c in copies for a in c.processed.anomalies})) or None
        fields["render_error"] = ";".join(c.render_error for c in copies if c.render_error) or None
        fields["size_out"] = ",".join(str(len(c.processed.data)) for c in copies)
        for copy in copies:
            d = copy.processed.decision
            # The reason's first word only ("undecodable", "malformed"...): labels must stay a small set.
            label = d.action if d.action != "pass-through" else f"pass-through:{d.reason.split(':')[0]}"
            self.metrics.copies.labels(t.name, label).inc()
        if self.queue is not None:
            return await self._enqueue(t.name, qid, mail_from, copies, envelope.smtp_utf8, fields)
        refused: dict[str, dsn.Refusal] = {}
        delivered: list[Outcome] = []
        first_refusal: PermanentError | None = None
        for i, copy in enumerate(copies):
            try:
                outcome = await self.delivery.deliver(
                    t, mail_from, list(copy.recipients), copy.processed.data, smtputf8=envelope.smtp_utf8)
            except PermanentError as e:
                # This copy's recipients are refused for good; the others still get theirs.
                first_refusal = first_refusal or e
                refused.update({r: dsn.Refusal(e.reply.code, f"{e.reply.enhanced} {e.reply.text}", "tenant endpoint")
                                for r in copy.recipients})
                continue
            except TransientError as e:
                if i > 0 and delivered:
                    log.warning("%s: copy %d of %d deferred after earlier copies were delivered: a retry "
                                "duplicates them (never loses any)", qid, i + 1, len(copies))
                raise e
            delivered.append(outcome)
            refused.update(outcome.refused)
        if not delivered:
            assert first_refusal is not None  # every copy either raised, was refused, or was delivered
            raise first_refusal
        fields["endpoint"] = delivered[0].endpoint
        fields["downstream"] = ";".join(o.reply[:120] for o in delivered)
        if refused:
            fields["refused"] = ",".join(refused)
            fields["dsn"] = await self._send_dsn(t, qid, raw, mail_from, refused)
        return str(Reply(250, "2.0.0", f"Ok {qid} accepted by tenant endpoint"))

    async def _enqueue(self, tenant: str, qid: str, mail_from: str, copies: list[pipeline.Copy], smtputf8: bool,
                       fields: dict[str, Any]) -> str:
        """Queue mode: 250 once every copy is fsync'd in the spool (RFC 5321 §6.1). A write error
        (ENOSPC, EIO...) is a 451: nothing is half-accepted, the client keeps the message."""
        assert self.queue is not None
        t = spool_now()
        entries = [(Entry(id=f"{qid}-{i}", tenant=tenant, mail_from=mail_from, rcpts=list(c.recipients),
                          smtputf8=smtputf8, created=t, next_attempt=t), c.processed.data)
                   for i, c in enumerate(copies)]
        try:
            await self.queue.enqueue(entries)
        except OSError as e:
            raise TransientError(replies.QUEUE_WRITE_FAILED, f"spool {self.queue.spool.root}: {e}") from e
        fields["queued"] = len(entries)
        return str(Reply(250, "2.0.0", f"Ok {qid} queued"))

    async def _send_dsn(
        self, tenant: Any, qid: str, raw: bytes, mail_from: str, refused: Any,
    ) -> str:
        """Tell the sender about recipients the tenant refused for good (RFC 3464).

        The accepted recipients already have the message, so the 250 stands whatever happens
        here; a DSN we cannot deliver is logged at ERROR for an operator (the queue mode will
        spool it instead)."""
        if not mail_from:
            return "none(null-sender)"  # RFC 3464 §2: never a DSN for a DSN
        msg = dsn.build(
            original=raw, mail_from=mail_from, refused=refused, reporting_mta=self.cfg.hostname,
            queue_id=qid, arrival=dt.datetime.now(dt.UTC), processed_header=self.cfg.processed_header,
        )
        try:
            await self.delivery.deliver(tenant, "", [mail_from], msg)
        except RelayError as e:
            log.error("DSN for %s to <%s> NOT delivered: %s", qid, msglog.safe(mail_from), msglog.safe(e.detail))
            return "failed"
        return "sent"


