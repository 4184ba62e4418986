"""The relay service: its lifecycle (listeners, reload, health, graceful stop) and the SMTP hooks.

What happens to one message is :mod:`relay.flow`; this module only starts, reloads and stops the
pieces and answers MAIL/RCPT. How it fails: start-up errors (bad config, busy port) raise before
any listener accepts; a reload that fails leaves the running configuration untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay import binding, metrics, replies
from relay import log as msglog
from relay.config import Config
from relay.cutthrough import CutThrough
from relay.delivery.client import Delivery
from relay.delivery.queue import QueueRunner
from relay.delivery.spool import Spool
from relay.errors import ConfigError, RelayError
from relay.flow import MessageFlow
from relay.smtp import tls
from relay.smtp.server import Ehlo, Guard, RelaySMTP, Slot, start_listener

log = logging.getLogger("relay")


class RelayHandler(Ehlo):
    """aiosmtpd hook object. Replies come from :mod:`relay.replies` only."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def handle_MAIL(
        self, _server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str],
    ) -> str:
        sec = self.relay.cfg.security
        if self.relay.guard.draining:
            return str(replies.SHUTTING_DOWN)  # stopping: no new transaction (RFC 5321 §3.8)
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
        self, _server: SMTP, _session: Session, envelope: Envelope, address: str, options: list[str],
    ) -> str:
        if not address.isascii() and not envelope.smtp_utf8:
            return str(replies.NEEDS_SMTPUTF8)  # RFC 6531 §3.4
        local, at, domain = address.rpartition("@")
        if not (at and local and domain and not domain.endswith('"')) and address.lower() != "postmaster":
            # aiosmtpd's parser takes <not an address> as the quoted local part "not an address";
            # relayed, the tenant would refuse it and the sender get a DSN instead of a plain 501.
            return str(replies.NOT_A_MAILBOX)
        if len(envelope.rcpt_tos) >= self.relay.cfg.security.max_recipients:
            return str(replies.TOO_MANY_RECIPIENTS)  # RFC 5321 §4.5.3.1.10: the earlier ones stand
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return str(replies.OK)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return await self.relay.flow.handle(server, session, envelope)

    @property
    def cut_through_after(self) -> int:
        """How much content the DATA reader waits for before it asks for :meth:`cut_through`."""
        return self.relay.cfg.delivery.cut_through_after

    def cut_through(self, session: Session, envelope: Envelope) -> CutThrough | None:
        """Asked by the DATA reader once ``cut_through_after`` octets are in (relay/cutthrough.py)."""
        return self.relay.flow.cut_through(session, envelope)

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
        # One spool and runner in every mode: queue mode queues messages in it; inline mode only
        # spools the DSNs it could not send (issue #12), so nothing after a 250 is lost.
        self.runner = QueueRunner(Spool(cfg.delivery.spool_dir, cfg.delivery.min_free_space),
                                  lambda: self.delivery, lambda: self.cfg, rescan=cfg.delivery.rescan_interval)
        self.metrics = metrics.Metrics(connections=lambda: self.guard.active, queued=lambda: len(self.runner),
                                       held=self.runner.held, certificates=self._certificates,
                                       oldest=self.runner.oldest_age)
        self._metrics_server: asyncio.Server | None = None
        self.flow = MessageFlow(self)  # one message through the relay (relay/flow.py)
        self.delivery.on_error = lambda tenant, reason: self.metrics.delivery_errors.labels(tenant, reason).inc()

    def smtp_factory(self, implicit_tls: bool = False, slot: Slot | None = None) -> SMTP:
        # On an implicit-TLS listener TLS is already up: no STARTTLS to offer or require.
        return RelaySMTP(
            self.handler, hostname=self.cfg.hostname, idle_timeout=self.cfg.idle_timeout,
            data_size_limit=self.cfg.max_message_size, tls_context=None if implicit_tls else self.tls_context,
            require_starttls=self.cfg.require_starttls and not implicit_tls, guard=self.guard, slot=slot,
        )

    async def start(self) -> None:
        if self.cfg.delivery.mode != "inline" or any(t.delivery_mode not in ("", "inline") for t in self.cfg.tenants) \
                or self.cfg.delivery.spool_dir.exists():
            await self.runner.start()  # before listening: whatever the spool holds is scheduled first
        inherited = dict(self.cfg.listen_sockets)  # a worker's: its supervisor's sockets by (host, port)
        for lst in self.cfg.listeners:
            factory = functools.partial(self.smtp_factory, lst.implicit_tls)
            # Implicit-TLS listeners keep the context they started with (asyncio binds it to the
            # server); STARTTLS ones pick up a reloaded certificate for each new session. A worker
            # serves the sockets its supervisor bound (one per address of the listener).
            fds: tuple[int | None, ...] = (None,)
            if inherited:
                if (lst.host, lst.port) not in inherited:
                    raise ConfigError(str(self.cfg.source), "listen",
                                      f"{lst.host}:{lst.port} is not a socket the supervisor bound: the listen "
                                      f"addresses changed since `serve --workers` started; restart it")
                fds = inherited[(lst.host, lst.port)]
            for fd in fds:
                sock = socket.socket(fileno=fd) if fd is not None else None
                self.servers.append(await start_listener(factory, lst, self.tls_context, self.guard, sock=sock))
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
        if new.event_loop != self.cfg.event_loop:
            log.warning("reload: service.event_loop changed; that takes a restart (the running loop is kept)")
        if new.delivery.spool_dir != self.cfg.delivery.spool_dir:
            log.warning("reload: delivery.spool_dir changed; that takes a restart (the old spool is kept)")
        self.guard.configure(sec)
        self.runner.spool.min_free = new.delivery.min_free_space
        self.tls_context = tls_context
        self.cfg = new
        log.info("configuration reloaded: %d tenant(s) [%s]", len(new.tenants), ", ".join(t.name for t in new.tenants))

    def _certificates(self) -> dict[str, Path]:
        """The certificates this relay presents, from the configuration in force (reload-aware)."""
        out = {"server": self.cfg.tls.cert}
        out.update({f"tenant:{t.name}": t.client_cert for t in self.cfg.tenants})
        return out

    def healthy(self) -> bool:
        return bool(self.servers) and all(s.is_serving() for s in self.servers)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop (SIGTERM): new sessions and new transactions get ``421 4.3.2`` while
        messages in flight finish (up to ``grace`` s, default ``listen.stop_grace``); then the
        listeners close, the queue runner stops between attempts and the pool closes. The spool
        is consistent at every point (it is at a kill -9 too)."""
        grace = self.cfg.stop_grace if grace is None else grace
        self.guard.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flow.idle.wait(), grace)
        if not self.flow.idle.is_set():
            log.warning("stop: %d message(s) still in flight after %.0f s; closing anyway (the client retries)",
                        self.flow.in_flight, grace)
        for s in self.servers:
            s.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        await self.runner.stop()  # spooled mail stays on disk for the next start
        await self.delivery.close()
