"""One message through the relay: the I/O shell around the one flow of :mod:`relay.pipeline`.

    accept (ingress) → loop check → bind → run (rules, render, stamp, trace) → deliver or queue → reply

Every step returns a value — :class:`Prepared` for the pure part, :class:`Delivered` for the
network part — and the single log line is built from those values by :func:`log_fields`; nothing
returns results through a mutated argument (issue #11). Big messages run their pure steps in a
worker thread so one cannot stall every other session (aiosmtpd #293).

How it fails: a :class:`relay.errors.RelayError` (or any exception) becomes the reply in exactly
one place, :func:`relay.replies.reply_for`; a 250 is only given after the tenant's 250 (inline) or
once every copy is fsync'd in the spool (queue mode).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import errno
import functools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay import binding, cutthrough, ingress, metrics, offload, pipeline, replies
from relay import log as msglog
from relay.config import Config, Tenant
from relay.delivery import dsn
from relay.delivery.client import Delivery, Outcome, body_ascii
from relay.delivery.queue import QueueRunner
from relay.delivery.spool import Entry
from relay.delivery.spool import now as spool_now
from relay.errors import PermanentError, RelayError, Reply, TransientError
from relay.mime import trace
from relay.smtp import tls
from relay.smtp.server import RelaySMTP

log = logging.getLogger("relay")


class Context(Protocol):
    """What the flow needs from the running relay; read per message, so a reload takes effect."""

    cfg: Config
    delivery: Delivery
    runner: QueueRunner  # the spool's runner in every mode (inline mode spools only what it must)
    metrics: metrics.Metrics


def new_queue_id() -> str:
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").rstrip("=")


def envelope_sender(env: Envelope) -> str:
    """aiosmtpd keeps the null sender as "<>"; we use ""."""
    s = env.mail_from or ""
    return "" if s == "<>" else s


@dataclass(frozen=True)
class Prepared:
    """The pure part's result: the tenant and the copies to hand back."""

    binding: binding.Binding
    copies: list[pipeline.Copy]


@dataclass(frozen=True)
class Delivered:
    """The network part's result, for the reply and the log line."""

    reply: str
    endpoint: str | None = None
    downstream: str | None = None
    refused: tuple[str, ...] = ()
    dsn: str | None = None
    queued: int | None = None


def bind_and_plan(cfg: Config, inbound: ingress.Inbound, mail_from: str, rcpts: list[str], peer: binding.Peer,
                  when: dt.datetime, received_for: Callable[[Sequence[str]], bytes]) -> Prepared:
    """Loop check → binding → :func:`relay.pipeline.run`, on the message as ingress left it (DESIGN:
    what we check is what the tenant gets). Pure."""
    hops = len(inbound.top.get("received", ()))
    if hops >= cfg.security.max_received:
        # RFC 5321 §6.3: a loop is detected by counting Received: fields.
        raise PermanentError(replies.LOOP_DETECTED, f"{hops} Received: fields")
    b = binding.bind(cfg, mail_from, inbound.raw, peer, top=inbound.top)
    copies = pipeline.run(inbound, policy=b.tenant.policy, envelope=pipeline.Envelope(mail_from, tuple(rcpts), when),
                          settings=pipeline.Settings.of(cfg), received_for=received_for)
    return Prepared(b, copies)


def _peer(session: Session) -> binding.Peer:
    return binding.Peer(ip=session.peer[0] if session.peer else None,
                        cert_names=tuple(tls.peer_names((session.ssl or {}).get("peercert"))),
                        sni=tls.sni_of(session.ssl))


def _tracer(cfg: Config, session: Session, envelope: Envelope, qid: str, when: dt.datetime
            ) -> Callable[[Sequence[str]], bytes]:
    """Our Received: field for a group of recipients (RFC 5321 §4.4). It holds values, not the
    session or the envelope: the envelope holds the cut-through, which holds this."""
    tls_info, peer_ip = tls.describe(session.ssl), session.peer[0] if session.peer else None
    helo, smtputf8, by = session.host_name, envelope.smtp_utf8, cfg.hostname

    def received_for(group: Sequence[str]) -> bytes:
        return trace.received(helo=helo, peer_ip=peer_ip, by=by, queue_id=qid, recipients=group, tls=tls_info,
                              smtputf8=smtputf8, when=when.astimezone())

    return received_for


@dataclass
class _Message:
    """What one DATA transaction has gathered so far (for the log line, whatever fails)."""

    qid: str
    peer: str | None
    mail_from: str
    rcpts: list[str]
    size_in: int
    t0: float = field(default_factory=time.monotonic)
    inbound: ingress.Inbound | None = None
    prepared: Prepared | None = None
    delivered: Delivered | None = None
    error: str | None = None
    cut: cutthrough.CutThrough | None = None


class MessageFlow:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def hold_time(self) -> float:
        d = self.ctx.cfg.delivery
        return d.connect_timeout + 3 * d.command_timeout + d.data_timeout + 60

    async def handle(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """aiosmtpd's DATA hook: the reply for this message (the one place errors become replies)."""
        self.in_flight += 1
        self.idle.clear()
        if isinstance(server, RelaySMTP):
            server.hold_timeout(self.hold_time())
        raw = envelope.original_content or b""
        cut: cutthrough.CutThrough | None = getattr(envelope, "cut", None)
        m = _Message(cut.qid if cut else new_queue_id(), session.peer[0] if session.peer else None,
                     envelope_sender(envelope), list(envelope.rcpt_tos), len(raw), cut=cut)
        try:
            reply = await self._process(m, raw, session, envelope)
        except Exception as e:
            reply = replies.reply_for(e)
            m.error = e.detail if isinstance(e, RelayError) else f"{type(e).__name__}: {e}"
        finally:
            if cut is not None:
                cut.close()  # not finished: the endpoint connection is closed without the dot
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()
        self._account(m, reply)
        return reply

    def cut_through(self, session: Session, envelope: Envelope) -> cutthrough.CutThrough | None:
        """The DATA reader's cut-through for this transaction (relay/cutthrough.py), or None when
        ``delivery.cut_through_after`` is 0. Its queue id and time are the message's: the trace
        field it speculates with is the one the message gets."""
        cfg = self.ctx.cfg
        after = cfg.delivery.cut_through_after
        if not after:
            return None
        qid, when = new_queue_id(), dt.datetime.now(dt.UTC)
        peer, received_for = _peer(session), _tracer(cfg, session, envelope, qid, when)
        mail_from, rcpts = envelope_sender(envelope), list(envelope.rcpt_tos)

        def start(prefix: bytes) -> cutthrough.Head | str:
            head = cutthrough.speculate(cfg, prefix, plan=bind_and_plan, mail_from=mail_from, rcpts=rcpts, peer=peer,
                                        when=when, received_for=received_for)
            if isinstance(head, cutthrough.Head) and (head.tenant.delivery_mode or cfg.delivery.mode) == "queue":
                return "queue mode"  # 250 once spooled: nothing to gain from the endpoint
            return head

        return cutthrough.CutThrough(after=after, qid=qid, when=when, start=start, delivery=self.ctx.delivery,
                                     smtputf8=envelope.smtp_utf8, mail_from=mail_from,
                                     timeout=cfg.delivery.data_timeout)

    async def _process(self, m: _Message, raw: bytes | bytearray, session: Session, envelope: Envelope) -> str:
        cfg = self.ctx.cfg
        peer = _peer(session)
        when = m.cut.when if m.cut is not None else dt.datetime.now(dt.UTC)
        received_for = _tracer(cfg, session, envelope, m.qid, when)

        # The DATA reader found no line starting with a dot (carried to delivery's dot-stuffing),
        # and no bare CR or LF (ingress has nothing to normalise). An envelope that says
        # neither (not the relay's own) leaves ingress to check for itself.
        dotless = bool(getattr(envelope, "dotless", False))
        crlf = bool(getattr(envelope, "crlf", False))
        m.inbound = await offload.run_sized(len(raw), functools.partial(pipeline.accept, dotless=dotless, crlf=crlf),
                                            raw, pipeline.Settings.of(cfg))
        m.prepared = await offload.run_sized(len(raw), bind_and_plan, cfg, m.inbound, m.mail_from, m.rcpts, peer, when,
                                             received_for)
        tenant = m.prepared.binding.tenant
        for copy in m.prepared.copies:
            d = copy.processed.decision
            # The reason's first word only ("undecodable", "malformed"...): labels must stay a small set.
            label = d.action if d.action != "pass-through" else f"pass-through:{d.reason.split(':')[0]}"
            self.ctx.metrics.copies.labels(tenant.name, label).inc()
        mode = tenant.delivery_mode or cfg.delivery.mode
        if mode == "queue":
            if m.cut is not None:
                m.cut.close()
            m.delivered = await self._enqueue(tenant.name, m, envelope.smtp_utf8)
        elif mode == "inline-then-queue":
            try:
                m.delivered = await self._deliver(tenant, m, envelope.smtp_utf8)
            except TransientError as e:
                # Nothing was handed over (a copy deferred after another was delivered is
                # spooled inside _deliver): spool it all, or give the client the endpoint's 4xx.
                try:
                    m.delivered = await self._enqueue(tenant.name, m, envelope.smtp_utf8)
                except TransientError:
                    raise e from None
                log.info("%s: tenant endpoint unavailable (%s); queued instead", m.qid, msglog.safe(e.detail))
        else:
            m.delivered = await self._deliver(tenant, m, envelope.smtp_utf8)
        return m.delivered.reply

    async def _deliver(self, t: Tenant, m: _Message, smtputf8: bool) -> Delivered:
        """Inline mode: each copy to the tenant's endpoint; 250 only after the tenant's 250."""
        assert m.prepared is not None and m.inbound is not None
        copies = m.prepared.copies
        refused: dict[str, dsn.Refusal] = {}
        delivered: list[Outcome] = []
        first_refusal: PermanentError | None = None
        queued: int | None = None
        for i, copy in enumerate(copies):
            try:
                p = copy.processed
                got = None
                if m.cut is not None and len(copies) == 1:
                    # The cut-through's dot, if this copy is what it has been sending (relay/cutthrough.py).
                    got = await m.cut.finish(t, copy.recipients, p.pieces, body_ascii(p.pieces, p.ascii), smtputf8)
                outcome = got or await self.ctx.delivery.deliver(t, m.mail_from, list(copy.recipients), p.pieces,
                                                                 smtputf8=smtputf8, crlf=p.crlf, dotless=p.dotless,
                                                                 ascii=p.ascii)
            except PermanentError as e:
                # This copy's recipients are refused for good; the others still get theirs.
                first_refusal = first_refusal or e
                refused.update({r: dsn.Refusal(e.reply.code, f"{e.reply.enhanced} {e.reply.text}", "tenant endpoint")
                                for r in copy.recipients})
                continue
            except TransientError as e:
                if not delivered:
                    raise  # nothing handed over yet: the client keeps the message and retries
                # Earlier copies are with the tenant: a 4xx now would make the client send them
                # again. Spool the rest instead and answer 250; only if that fails, 451 (a
                # duplicate, never a loss).
                queued = await self._spool_rest(t, m, i, smtputf8, e)
                break
            delivered.append(outcome)
            refused.update(outcome.refused)
        if not delivered:
            assert first_refusal is not None  # every copy either raised, was refused, or was delivered
            raise first_refusal
        sent = await self._send_dsn(t, m, refused, [r for o in delivered for r in o.accepted]) if refused else None
        return Delivered(str(Reply(250, "2.0.0", f"Ok {m.qid} accepted by tenant endpoint")), delivered[0].endpoint,
                         ";".join(o.reply[:120] for o in delivered), tuple(refused), sent, queued)

    async def _spool_rest(self, t: Tenant, m: _Message, first: int, smtputf8: bool, why: TransientError) -> int:
        """Spool the copies from ``first`` on (deferred after earlier copies were delivered); how many."""
        try:
            n = await self._spool_copies(t.name, m, smtputf8, first)
        except Exception as e:
            log.warning("%s: cop(ies) from %d deferred (%s) after earlier ones were delivered, and spooling them "
                        "failed (%s): a retry duplicates the delivered ones (never loses any)", m.qid, first + 1,
                        msglog.safe(why.detail), e)
            raise why from e
        log.info("%s: %d cop(ies) deferred (%s) after earlier ones were delivered; spooled for retry", m.qid,
                 n, msglog.safe(why.detail))
        return n

    async def _enqueue(self, tenant: str, m: _Message, smtputf8: bool) -> Delivered:
        """Queue mode: 250 once every copy is fsync'd in the spool (RFC 5321 §6.1). A write error
        (ENOSPC, EIO...) is a 4xx: nothing is half-accepted, the client keeps the message."""
        n = await self._spool_copies(tenant, m, smtputf8)
        return Delivered(str(Reply(250, "2.0.0", f"Ok {m.qid} queued")), queued=n)

    async def _spool_copies(self, tenant: str, m: _Message, smtputf8: bool, first: int = 0) -> int:
        """Commit the message's copies from ``first`` on to the spool, all or none; how many."""
        queue = self.ctx.runner
        assert m.prepared is not None
        t = spool_now()
        entries = [(Entry(id=f"{m.qid}-{i}", tenant=tenant, mail_from=m.mail_from, rcpts=list(c.recipients),
                          smtputf8=smtputf8, created=t, next_attempt=t), c.processed.data)
                   for i, c in enumerate(m.prepared.copies[first:], start=first)]
        try:
            await queue.ensure_started()
            await queue.enqueue(entries)
        except OSError as e:
            # ENOSPC/EDQUOT (or below min_free_space): 452 4.3.1; EIO, a failed fsync and the
            # rest: 451 4.3.0. Either way nothing was kept and the client keeps the message.
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise TransientError(replies.SPOOL_FULL if full else replies.QUEUE_WRITE_FAILED,
                                 f"spool {queue.spool.root}: {e}") from e
        return len(entries)

    async def _send_dsn(self, tenant: Tenant, m: _Message, refused: dict[str, dsn.Refusal],
                        delivered: Sequence[str]) -> str:
        """Tell the sender about recipients the tenant refused for good (RFC 3464). The accepted
        recipients already have the message, so nothing here may change the 250 (a 4xx now would
        make Exchange Online send the message again: a duplicate). A DSN that cannot be sent now
        is spooled and retried like queued mail; only if even that fails is it only logged."""
        if not m.mail_from:
            return "none(null-sender)"  # RFC 3464 §2: never a DSN for a DSN
        assert m.inbound is not None
        cfg = self.ctx.cfg
        smtputf8 = not m.mail_from.isascii()  # RFC 6531 §3.4: the only way to reach that sender
        try:
            msg = dsn.build(original=m.inbound.raw, mail_from=m.mail_from, refused=refused,
                            reporting_mta=cfg.hostname, queue_id=m.qid, arrival=dt.datetime.now(dt.UTC),
                            processed_header=cfg.processed_header, delivered=delivered)
        except Exception as e:
            log.error("DSN for %s to <%s> could not be built (%s: %s); failed recipients: %s", m.qid,
                      msglog.safe(m.mail_from), type(e).__name__, msglog.safe(str(e)), ", ".join(refused))
            return "failed"
        try:
            await self.ctx.delivery.deliver(tenant, "", [m.mail_from], msg, smtputf8=smtputf8)
        except PermanentError as e:  # the sender's own address is refused for good: retrying cannot help
            log.error("DSN for %s to <%s> refused: %s", m.qid, msglog.safe(m.mail_from), msglog.safe(e.detail))
            return "refused"
        except Exception as e:
            why = e.detail if isinstance(e, RelayError) else f"{type(e).__name__}: {e}"
            return await self._spool_dsn(tenant, m, msg, smtputf8, why)
        return "sent"

    async def _spool_dsn(self, tenant: Tenant, m: _Message, msg: bytes, smtputf8: bool, why: str) -> str:
        runner = self.ctx.runner
        t = spool_now()
        entry = Entry(id=f"{m.qid}-dsn", tenant=tenant.name, mail_from="", rcpts=[m.mail_from], smtputf8=smtputf8,
                      created=t, next_attempt=t + self.ctx.cfg.delivery.retry_min)
        try:
            await runner.ensure_started()
            await runner.enqueue([(entry, msg)])
        except Exception as e:
            log.error("DSN for %s to <%s> NOT delivered (%s) and could not be spooled (%s: %s)", m.qid,
                      msglog.safe(m.mail_from), msglog.safe(why), type(e).__name__, msglog.safe(str(e)))
            return "failed"
        log.warning("DSN for %s to <%s> not delivered now (%s); spooled as %s", m.qid, msglog.safe(m.mail_from),
                    msglog.safe(why), entry.id)
        return "spooled"

    def _account(self, m: _Message, reply: str) -> None:
        elapsed = time.monotonic() - m.t0
        metric = self.ctx.metrics
        metric.latency.observe(elapsed)
        metric.replies.labels(reply[:3]).inc()
        result = "accepted" if reply.startswith("2") else "deferred" if reply.startswith("4") else "refused"
        tenant = m.prepared.binding.tenant.name if m.prepared else "-"
        metric.messages.labels(tenant, result).inc()
        if log.isEnabledFor(logging.INFO):  # the line is built only to be written (--log-level warning: never)
            fields = log_fields(m, reply, elapsed)
            log.info("message %s", msglog.fmt(fields), extra={"fields": fields})  # "fields": for --log-format json


def log_fields(m: _Message, reply: str, elapsed: float) -> dict[str, Any]:
    """The one log line of a message, from what each step returned."""
    f: dict[str, Any] = {"qid": m.qid, "peer": m.peer, "from": f"<{m.mail_from}>", "rcpts": len(m.rcpts),
                         "message_id": "-", "size_in": m.size_in}
    if m.inbound is not None:
        mids = m.inbound.top.get("message-id")
        f["message_id"] = mids[0][:200] if mids else "-"
        f["normalised"] = "line-endings" if m.inbound.normalised else None
    if m.prepared is not None:
        copies = m.prepared.copies
        f.update({
            "tenant": m.prepared.binding.tenant.name, "bound_by": m.prepared.binding.how,
            "copies": len(copies) if len(copies) > 1 else None,
            "decision": ";".join(str(c.processed.decision) for c in copies),
            "rules": ";".join(c.sections or "-" for c in copies) if any(c.sections for c in copies) else None,
            "placement": ";".join(c.processed.placement for c in copies if c.processed.placement) or None,
            "placement_unsure": ";".join(d for c in copies for d in c.processed.doubts) or None,
            "anomalies": ",".join(sorted({a for c in copies for a in c.processed.anomalies})) or None,
            "render_error": ";".join(c.render_error for c in copies if c.render_error) or None,
            "size_out": ",".join(str(c.processed.size) for c in copies),
        })
    if m.delivered is not None:
        d = m.delivered
        f.update({"endpoint": d.endpoint, "downstream": d.downstream, "refused": ",".join(d.refused) or None,
                  "dsn": d.dsn, "queued": d.queued})
    if m.cut is not None and m.cut.outcome is not None:
        f["cut_through"] = m.cut.outcome
    f.update({"error": m.error, "reply": reply, "latency_ms": round(elapsed * 1000, 1)})
    return f
