"""Inline delivery to a tenant's inbound connector (aiosmtplib), with a small connection pool.

The promise (DESIGN "Never lose mail"): the relay answers 250 only after the tenant answered
250. Every outcome we are unsure of becomes a :class:`TransientError` (4xx to Exchange Online,
which retries); duplicates beat loss.

* STARTTLS is mandatory (except to a loopback IP in the benchmark profile, see DeliveryConfig):
  a server that does not offer it fails the attempt (no downgrade to plaintext, the "STARTTLS
  stripping" attack). The server certificate is verified against the
  tenant's ``tls_server_name`` and CA bundle; the tenant's client certificate is presented.
* MAIL/RCPT are sent as raw addresses (no re-quoting). If any recipient is deferred (4xx) we send
  no message content at all and defer the whole message: nothing is delivered twice and nothing is
  lost. If some are refused for good (5xx) the rest get the message and the caller sends a DSN.
* To an endpoint that advertises PIPELINING (Exchange Online does), MAIL, RCPT and DATA go out as
  one RFC 2920 group: two round trips per message instead of three plus one per recipient.
* Messages go out with ``data()`` on the bytes we hold — never ``send_message`` (it re-folds
  headers, drops Bcc and mangles "From " lines).
* Connections are reused per (tenant, address) and closed on any error, so the next send reopens
  cleanly (Mailman's habit).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
from aiosmtplib.response import SMTPResponse

from relay import replies, wire
from relay.config import DeliveryConfig, Tenant
from relay.delivery.dsn import Refusal
from relay.delivery.endpoints import Resolver, Target
from relay.errors import ConfigError, PermanentError, RelayError, Reply, TransientError

log = logging.getLogger("relay.delivery")


@dataclass(frozen=True)
class Outcome:
    accepted: tuple[str, ...]
    refused: Mapping[str, Refusal]
    reply: str  # the endpoint's final reply, e.g. "250 2.6.0 <id> Queued mail for delivery"
    endpoint: str
    reused: bool


@dataclass
class _Conn:
    smtp: aiosmtplib.SMTP
    tenant: str
    target: Target
    idle_since: float = field(default_factory=time.monotonic)


class _RetryFresh(Exception):
    """A pooled connection turned out dead before anything was sent: try a new one."""


def client_context(cfg: DeliveryConfig, tenant: Tenant) -> ssl.SSLContext:
    """TLS context for delivering to ``tenant``: verify the server, present the tenant's cert."""
    try:
        ctx = ssl.create_default_context(cafile=str(cfg.ca_bundle) if cfg.ca_bundle else None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("delivery.ca_bundle", "", f"{cfg.ca_bundle}: cannot load CA bundle: {e}") from e
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tenant.client_cert), str(tenant.client_key))
    except FileNotFoundError as e:
        raise ConfigError(str(tenant.source), "inbound.client_cert",
                          f"{e.filename}: file not found (run `signature-relay certs init` for dev)") from e
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(str(tenant.source), "inbound.client_cert",
                          f"cannot load {tenant.client_cert} / {tenant.client_key}: {e}") from e
    return ctx


def _reply(resp: SMTPResponse) -> str:
    return f"{resp.code} {resp.message}".replace("\n", " ")


def _downstream(code: int, message: str) -> Reply:
    """Our reply carrying the endpoint's own words (its enhanced code when it gave one).

    A downstream 421 ("closing connection") is about *its* connection, not ours: it becomes 451.
    """
    message = message.replace("\n", " ").strip()
    if code == 421:
        code = 451
    klass = str(code)[0]
    first, _, rest = message.partition(" ")
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and first[0] == klass:
        return Reply(code, first, f"Tenant endpoint said: {rest}")
    return Reply(code, f"{klass}.0.0", f"Tenant endpoint said: {message}")


# Why an attempt failed, as a small label set (signature_relay_delivery_errors_total{reason}).
ERROR_REASONS: Mapping[Reply, str] = {
    replies.ENDPOINT_TLS_FAILED: "tls", replies.ENDPOINT_TIMEOUT: "timeout",
    replies.ENDPOINT_UNAVAILABLE: "unavailable", replies.ENDPOINT_DNS_FAILED: "dns",
    replies.ENDPOINT_DEFERRED: "deferred",
}


class Delivery:
    def __init__(
        self, cfg: DeliveryConfig, tenants: Sequence[Tenant], *, local_hostname: str,
        resolver: Resolver | None = None,
    ) -> None:
        self.cfg = cfg
        self.local_hostname = local_hostname
        self.resolver = resolver or Resolver(cfg.dns_servers, cfg.dns_timeout)
        # Built at start-up so a missing or broken client certificate stops the relay with the
        # file and key named, instead of deferring every message at run time.
        self._contexts = {t.name: client_context(cfg, t) for t in tenants}
        self._pool: dict[tuple[str, str, int], list[_Conn]] = {}
        # (tenant, reason) for every failed attempt: the delivery-errors metric (relay/metrics.py)
        self.on_error: Callable[[str, str], None] | None = None

    # --- public --------------------------------------------------------------------------------

    def update(self, cfg: DeliveryConfig, tenants: Sequence[Tenant]) -> None:
        """New settings and client certificates (config reload). Built before anything changes, so
        a bad certificate raises ConfigError and leaves us as we were; pooled connections, made
        with the old certificates, are closed."""
        contexts = {t.name: client_context(cfg, t) for t in tenants}
        self.cfg, self._contexts = cfg, contexts
        if cfg.dns_servers != self.resolver.servers:
            self.resolver = Resolver(cfg.dns_servers, cfg.dns_timeout)
        pools, self._pool = self._pool, {}
        for conns in pools.values():
            for c in conns:
                self._discard(c)

    def count_error(self, tenant: Tenant | str, e: RelayError) -> None:
        """One failed attempt to ``tenant``'s endpoint, for the delivery-errors metric."""
        if self.on_error is not None:
            name = tenant if isinstance(tenant, str) else tenant.name
            self.on_error(name, ERROR_REASONS.get(e.reply, "refused" if isinstance(e, PermanentError) else "other"))

    async def deliver(
        self, tenant: Tenant, mail_from: str, rcpts: Sequence[str], data: bytes | tuple[wire.Piece, ...], *,
        smtputf8: bool = False, crlf: bool = False, dotless: bool = False, ascii: bool | None = None,
    ) -> Outcome:
        """Deliver ``data`` to ``tenant``'s endpoint. Returns only when the endpoint answered 250
        for the accepted recipients; raises Transient/PermanentError otherwise. ``crlf``: the
        caller has proved every line break in ``data`` is CRLF (:attr:`StampResult.crlf`);
        ``dotless``: that no line starts with a dot (:attr:`StampResult.dotless`). ``data`` may be
        a big message's pieces (:attr:`StampResult.pieces`), written one after another; ``ascii``
        then says whether it needs BODY=8BITMIME."""
        pieces = data if isinstance(data, tuple) else (data,)
        known = (crlf, dotless, ascii)
        targets = await self.resolver.targets(tenant.endpoint)
        last: RelayError | None = None
        for target in targets:
            try:
                conn, reused = await self._checkout(tenant, target)
            except TransientError as e:
                log.warning("endpoint %s:%s (%s) failed: %s", target.address, target.port, target.mx_host, e.detail)
                self.count_error(tenant, e)
                last = e
                continue
            try:
                try:
                    return await self._transaction(conn, reused, mail_from, rcpts, pieces, smtputf8, known)
                except _RetryFresh:
                    self._discard(conn)
                    conn, reused = await self._connect(tenant, target), False
                    return await self._transaction(conn, reused, mail_from, rcpts, pieces, smtputf8, known)
            except BaseException as e:
                # Unless the transaction ended on a clean reply (and checked the connection back
                # in), the session is in an unknown state: never reuse it.
                if not self._pooled(conn):
                    self._discard(conn)
                if isinstance(e, RelayError):
                    self.count_error(tenant, e)
                raise
        assert last is not None
        raise last

    async def close(self) -> None:
        """QUIT every pooled connection (shutdown)."""
        pools, self._pool = self._pool, {}
        for conns in pools.values():
            for c in conns:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.smtp.quit(), 5)
                c.smtp.close()

    # --- connections ---------------------------------------------------------------------------

    async def _checkout(self, tenant: Tenant, target: Target) -> tuple[_Conn, bool]:
        key = (tenant.name, target.address, target.port)
        pool = self._pool.get(key, [])
        now = time.monotonic()
        while pool:
            c = pool.pop()
            if c.smtp.is_connected and now - c.idle_since < self.cfg.pool_idle:
                return c, True
            self._discard(c)
        return await self._connect(tenant, target), False

    def _checkin(self, conn: _Conn) -> None:
        key = (conn.tenant, conn.target.address, conn.target.port)
        pool = self._pool.setdefault(key, [])
        if len(pool) >= self.cfg.pool_size or not conn.smtp.is_connected:
            self._discard(conn)
            return
        conn.idle_since = time.monotonic()
        pool.append(conn)

    def _pooled(self, conn: _Conn) -> bool:
        key = (conn.tenant, conn.target.address, conn.target.port)
        return any(c is conn for c in self._pool.get(key, ()))

    def _discard(self, conn: _Conn) -> None:
        conn.smtp.close()

    async def _connect(self, tenant: Tenant, target: Target) -> _Conn:
        ctx = self._contexts[tenant.name]
        smtp = aiosmtplib.SMTP(
            hostname=target.address, port=target.port, local_hostname=self.local_hostname,
            timeout=self.cfg.command_timeout, start_tls=False, tls_context=ctx,
        )
        where = f"{target.address}:{target.port}"
        try:
            await smtp.connect(timeout=self.cfg.connect_timeout)
            await smtp.ehlo()
            if self.cfg.plaintext_loopback_benchmark and _is_loopback(target.address):
                return _Conn(smtp, tenant.name, target)  # benchmark profile: see DeliveryConfig
            if not smtp.supports_extension("starttls"):
                # RFC 3207 §4: a client that requires TLS must not continue without it.
                raise TransientError(replies.ENDPOINT_TLS_FAILED, f"{where} does not offer STARTTLS")
            await smtp.starttls(server_hostname=tenant.tls_server_name, tls_context=ctx)
            resp = await smtp.ehlo()
        except RelayError:
            smtp.close()
            raise
        except ssl.SSLError as e:
            smtp.close()
            raise TransientError(replies.ENDPOINT_TLS_FAILED, f"{where}: TLS failed: {e}") from e
        except (aiosmtplib.SMTPTimeoutError, TimeoutError) as e:
            smtp.close()
            raise TransientError(replies.ENDPOINT_TIMEOUT, f"{where}: timeout during connect/STARTTLS") from e
        except (aiosmtplib.SMTPException, OSError) as e:
            smtp.close()
            raise TransientError(replies.ENDPOINT_UNAVAILABLE, f"{where}: {type(e).__name__}: {e}") from e
        del resp
        return _Conn(smtp, tenant.name, target)

    # --- cut-through (relay/cutthrough.py) ------------------------------------------------------

    async def open_stream(self, tenant: Tenant, mail_from: str, rcpts: Sequence[str], *, smtputf8: bool,
                          ascii: bool) -> Stream | str:
        """A transaction to ``tenant``'s endpoint with DATA answered 354, for content written as it
        arrives; or why there is none (the caller then delivers as always, and that path reports
        any failure). Only as one RFC 2920 group, to an endpoint that offers PIPELINING (Exchange
        Online does), and only when every recipient is accepted: anything else is store and
        forward's to handle (a refused recipient's DSN, a deferred one's 4xx). The MAIL command
        is what :meth:`deliver` would send but for SIZE, which is not known yet (RFC 1870: optional)."""
        try:
            targets = await self.resolver.targets(tenant.endpoint)
        except RelayError as e:
            return e.detail
        why = "no endpoint address"
        for target in targets:
            try:
                conn, reused = await self._checkout(tenant, target)
            except TransientError as e:
                why = e.detail
                continue
            got = await self._open(conn, reused, mail_from, rcpts, smtputf8, ascii)
            if got == "retry" and reused:  # a pooled connection the endpoint had closed
                try:
                    conn, reused = await self._connect(tenant, target), False
                except TransientError as e:
                    return e.detail
                got = await self._open(conn, reused, mail_from, rcpts, smtputf8, ascii)
            return got if isinstance(got, Stream) else f"{target.address}:{target.port}: {got}"
        return why

    async def _open(self, conn: _Conn, reused: bool, mail_from: str, rcpts: Sequence[str], smtputf8: bool,
                    ascii: bool) -> Stream | str:
        smtp = conn.smtp
        if not _can_pipeline(smtp, (b"\r\n",), True):
            self._checkin(conn)
            return "no PIPELINING"
        where = f"{conn.target.address}:{conn.target.port}"
        try:
            opts = self._mail_options(smtp, (), smtputf8, where, ascii, size=False)
        except PermanentError:
            self._checkin(conn)
            return "no SMTPUTF8"
        lines = _group(mail_from, rcpts, "utf-8" if smtputf8 else "ascii", opts)
        try:
            got = await command_group(smtp, lines, self.cfg.command_timeout)
        except (aiosmtplib.SMTPException, ConnectionError, ValueError) as e:
            smtp.close()
            return "retry" if isinstance(e, (aiosmtplib.SMTPServerDisconnected, ConnectionError)) else str(e)
        if not got:
            smtp.close()
            return "retry"
        if len(got) == len(lines) and got[-1].code == 354 and got[0].code == 250 and \
                all(r.code in (250, 251) for r in got[1:-1]):
            conn.smtp.protocol._response_pending = True  # type: ignore[union-attr]  # the dot's reply is expected
            return Stream(self, conn, reused, where, tuple(rcpts))
        # Not every recipient accepted (or MAIL/DATA refused): no content at all. A DATA that was
        # answered 354 anyway is ended by closing the connection, never with a dot (see _pipelined).
        smtp.close()
        return "the endpoint answered " + "; ".join(_reply(r)[:80] for r in got if r.code not in (250, 251, 354))

    # --- the transaction -------------------------------------------------------------------------

    async def _transaction(
        self, conn: _Conn, reused: bool, mail_from: str, rcpts: Sequence[str], pieces: tuple[wire.Piece, ...],
        smtputf8: bool, known: tuple[bool, bool, bool | None] = (False, False, None),
    ) -> Outcome:
        """MAIL, RCPT for each recipient, DATA: DATA only when every recipient was accepted or
        refused for good (a deferred one means no DATA at all, so a retry cannot duplicate)."""
        where = f"{conn.target.address}:{conn.target.port}"
        enc = "utf-8" if smtputf8 else "ascii"
        crlf, dotless, ascii = known  # what the stamper proved about the pieces (see deliver)
        opts = self._mail_options(conn.smtp, pieces, smtputf8, where, ascii)
        if _can_pipeline(conn.smtp, pieces, crlf):
            lines = _group(mail_from, rcpts, enc, opts)
            return await self._pipelined(conn, reused, where, lines, rcpts, pieces, dotless)
        await self._mail(conn, reused, where, mail_from.encode(enc), opts)
        accepted, refused, deferred = await self._rcpts(conn, where, rcpts, enc)
        if deferred or not accepted:
            await self._rset(conn.smtp)
            self._checkin(conn)
            raise self._no_data(where, refused, deferred)
        final = await self._data(conn, where, pieces, crlf, dotless)
        self._checkin(conn)
        return Outcome(tuple(accepted), refused, _reply(final), f"{where} ({conn.target.mx_host})", reused)

    async def _pipelined(
        self, conn: _Conn, reused: bool, where: str, lines: list[bytes], rcpts: Sequence[str],
        pieces: tuple[wire.Piece, ...], dotless: bool,
    ) -> Outcome:
        """The same transaction as one RFC 2920 command group: MAIL, every RCPT and DATA written
        at once, then one reply read per command, in order (RFC 2920 §3.1: DATA ends the group,
        and every reply is checked). Against a remote endpoint this takes two round trips instead
        of three plus one per recipient (Exchange Online answers each command after 100-200 ms
        seen from outside Microsoft's network), and fewer wake-ups per message on loopback.

        The rules of the sequential path hold: a deferred recipient means no message at all; if
        the endpoint nevertheless answered DATA with 354, the connection is closed before a single
        octet of content is sent: a server that loses the connection cancels the pending
        transaction as if it had received RSET (RFC 5321 §3.8), so nothing is delivered and a
        retry cannot duplicate it."""
        got = await self._group(conn, reused, where, lines)
        started = len(got) == len(lines) and got[-1].code == 354
        mail = got[0]
        if mail.code != 250:
            if started:
                conn.smtp.close()  # a server that starts DATA after refusing MAIL: stop before any content
            elif mail.code != 421:
                await self._rset(conn.smtp)
            if mail.code == 421 and reused:
                raise _RetryFresh()
            raise self._error(mail, where, "MAIL")
        accepted, refused, deferred = self._sort_rcpts(conn, zip(rcpts, got[1:len(lines) - 1], strict=False))
        if len(got) < len(lines):
            raise TransientError(replies.ENDPOINT_UNAVAILABLE,
                                 f"{where}: disconnected after {len(got)} of {len(lines)} pipelined replies")
        if deferred or not accepted:
            if started:
                conn.smtp.close()  # see the docstring: ending it with "." would deliver to the accepted ones
            else:
                await self._rset(conn.smtp)
                self._checkin(conn)
            raise self._no_data(where, refused, deferred)
        if not started:
            await self._rset(conn.smtp)
            self._checkin(conn)
            raise self._error(got[-1], where, "DATA")
        final = await self._data(conn, where, pieces, True, dotless, started=True)
        self._checkin(conn)
        return Outcome(tuple(accepted), refused, _reply(final), f"{where} ({conn.target.mx_host})", reused)

    async def _group(self, conn: _Conn, reused: bool, where: str, lines: list[bytes]) -> list[SMTPResponse]:
        """:func:`command_group`'s replies (at least MAIL's), its failures as our errors."""
        try:
            got = await command_group(conn.smtp, lines, self.cfg.command_timeout)
        except aiosmtplib.SMTPTimeoutError as e:
            raise TransientError(replies.ENDPOINT_TIMEOUT, f"{where}: timeout at MAIL/RCPT/DATA (pipelined)") from e
        except (aiosmtplib.SMTPException, ConnectionError) as e:
            if reused and isinstance(e, (aiosmtplib.SMTPServerDisconnected, ConnectionError)):
                raise _RetryFresh() from e  # a pooled connection the endpoint had already closed
            raise TransientError(replies.ENDPOINT_UNAVAILABLE, f"{where}: {e} at MAIL/RCPT/DATA") from e
        if not got:
            if reused:
                raise _RetryFresh()
            raise TransientError(replies.ENDPOINT_UNAVAILABLE, f"{where}: disconnected at MAIL")
        return got

    @staticmethod
    def _no_data(where: str, refused: Mapping[str, Refusal], deferred: list[tuple[str, SMTPResponse]]) -> RelayError:
        """Why no DATA was sent: a deferred recipient (4xx for the whole message) or none accepted."""
        if deferred:
            r, rr = deferred[0]
            return TransientError(_downstream(rr.code, rr.message),
                                  f"{where}: {len(deferred)} recipient(s) deferred, first <{r}>: {_reply(rr)}")
        first = next(iter(refused.values()))
        return PermanentError(_downstream(first.code, first.text),
                              f"{where}: every recipient refused, first: {first.code} {first.text}")

    @staticmethod
    def _mail_options(smtp: aiosmtplib.SMTP, pieces: tuple[wire.Piece, ...], smtputf8: bool, where: str,
                      ascii: bool | None = None, *, size: bool = True) -> list[bytes]:
        """MAIL's parameters. ``size``: with SIZE (not known yet to a cut-through, RFC 1870: optional)."""
        opts: list[bytes] = []
        if smtputf8:
            if not smtp.supports_extension("smtputf8"):
                raise PermanentError(replies.SMTPUTF8_UNSUPPORTED, f"{where} lacks SMTPUTF8 (RFC 6531 §3.2)")
            opts.append(b"SMTPUTF8")
        if smtp.supports_extension("8bitmime") and not body_ascii(pieces, ascii):
            opts.append(b"BODY=8BITMIME")  # RFC 6152
        if size and smtp.supports_extension("size"):
            opts.append(b"SIZE=%d" % wire.size_of(pieces))
        return opts

    async def _mail(self, conn: _Conn, reused: bool, where: str, sender: bytes, opts: list[bytes]) -> None:
        try:
            resp = await conn.smtp.execute_command(b"MAIL", b"FROM:<" + sender + b">", *opts)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as e:
            if reused:
                raise _RetryFresh() from e
            raise TransientError(replies.ENDPOINT_UNAVAILABLE, f"{where}: disconnected at MAIL") from e
        except aiosmtplib.SMTPTimeoutError as e:
            raise TransientError(replies.ENDPOINT_TIMEOUT, f"{where}: timeout at MAIL") from e
        if resp.code == 421 and reused:
            raise _RetryFresh()
        if resp.code != 250:
            await self._rset(conn.smtp)
            raise self._error(resp, where, "MAIL")

    async def _rcpts(self, conn: _Conn, where: str, rcpts: Sequence[str], enc: str
                     ) -> tuple[list[str], dict[str, Refusal], list[tuple[str, SMTPResponse]]]:
        answered: list[tuple[str, SMTPResponse]] = []
        for r in rcpts:
            try:
                rr = await conn.smtp.execute_command(b"RCPT", b"TO:<" + r.encode(enc) + b">")
            except aiosmtplib.SMTPTimeoutError as e:
                raise TransientError(replies.ENDPOINT_TIMEOUT, f"{where}: timeout at RCPT") from e
            except (aiosmtplib.SMTPException, ConnectionError) as e:
                raise TransientError(replies.ENDPOINT_UNAVAILABLE, f"{where}: {e} at RCPT") from e
            answered.append((r, rr))
        return self._sort_rcpts(conn, answered)

    @staticmethod
    def _sort_rcpts(conn: _Conn, answered: Iterable[tuple[str, SMTPResponse]]
                    ) -> tuple[list[str], dict[str, Refusal], list[tuple[str, SMTPResponse]]]:
        """Accepted (250/251), refused for good (5xx) and deferred (anything else) recipients."""
        accepted: list[str] = []
        refused: dict[str, Refusal] = {}
        deferred: list[tuple[str, SMTPResponse]] = []
        for r, rr in answered:
            if rr.code in (250, 251):
                accepted.append(r)
            elif 500 <= rr.code < 600:
                refused[r] = Refusal(rr.code, rr.message.replace("\n", " "), conn.target.mx_host)
            else:
                deferred.append((r, rr))
        return accepted, refused, deferred

    async def _data(self, conn: _Conn, where: str, data: bytes | tuple[wire.Piece, ...], crlf: bool = False,
                    dotless: bool = False, *, started: bool = False) -> SMTPResponse:
        try:
            return await send_data(conn.smtp, data, self.cfg.data_timeout, crlf=crlf, dotless=dotless,
                                   started=started)
        except aiosmtplib.SMTPDataError as e:
            await self._rset(conn.smtp)
            self._checkin(conn)
            raise self._error(SMTPResponse(e.code, e.message), where, "DATA") from e
        except (aiosmtplib.SMTPException, ConnectionError) as e:
            raise _unsure(where, e) from e

    async def _rset(self, smtp: aiosmtplib.SMTP) -> None:
        with contextlib.suppress(Exception):
            await smtp.rset()

    def _error(self, resp: SMTPResponse, where: str, stage: str) -> RelayError:
        detail = f"{where}: {stage} answered {_reply(resp)}"
        reply = _downstream(resp.code, resp.message)
        if 500 <= resp.code < 600:
            return PermanentError(reply, detail)
        if 400 <= resp.code < 500:
            return TransientError(reply, detail)
        # A 2xx/3xx where an error was expected is a protocol violation: be safe, retry later.
        return TransientError(replies.ENDPOINT_DEFERRED, detail)


class Stream:
    """A transaction whose DATA was answered 354 (:meth:`Delivery.open_stream`): content is written
    as it comes (:meth:`write`: dot-stuffed, CRLF-only whole lines; the caller's job), and only
    :meth:`finish` writes the final dot. :meth:`abort` closes the connection instead, so the
    endpoint keeps nothing (RFC 5321 §3.8)."""

    def __init__(self, owner: Delivery, conn: _Conn, reused: bool, where: str, accepted: tuple[str, ...]) -> None:
        self._owner, self._conn, self._reused, self.where, self._accepted = owner, conn, reused, where, accepted
        self.done = False

    async def write(self, data: bytes) -> None:
        """Write ``data`` once the transport has room for it (its flow control), so no more than
        about one chunk waits in memory however slow the endpoint reads."""
        proto: Any = self._conn.smtp.protocol
        transport = getattr(proto, "transport", None)
        if self.done or proto is None or transport is None or transport.is_closing():
            raise TransientError(replies.ENDPOINT_UNAVAILABLE, f"{self.where}: connection lost during DATA")
        proto.write(data)
        drain = getattr(proto, "_drain_helper", None)
        if drain is not None:
            try:
                await asyncio.wait_for(drain(), self._owner.cfg.data_timeout)
            except TimeoutError:
                self.abort()
                raise TransientError(replies.ENDPOINT_TIMEOUT, f"{self.where}: timeout writing DATA") from None
            except ConnectionError as e:
                self.abort()
                raise TransientError(replies.ENDPOINT_UNAVAILABLE, f"{self.where}: {e} during DATA") from e

    async def finish(self) -> Outcome:
        """The final dot and the endpoint's reply to it: the outcome, as :meth:`Delivery.deliver`
        gives it and with its errors."""
        if self.done:
            raise TransientError(replies.ENDPOINT_UNAVAILABLE, f"{self.where}: transaction already ended")
        self.done = True
        owner, conn, where = self._owner, self._conn, self.where
        try:
            response = await self._dot()
        except RelayError as e:
            owner.count_error(conn.tenant, e)  # the delivery-errors metric, as deliver() counts its own
            raise
        owner._checkin(conn)
        return Outcome(self._accepted, {}, _reply(response), f"{where} ({conn.target.mx_host})", self._reused)

    async def _dot(self) -> SMTPResponse:
        """The final dot and a 250 to it, or the error."""
        owner, conn, where = self._owner, self._conn, self.where
        proto: Any = conn.smtp.protocol
        try:
            if proto is None:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            proto.write(b".\r\n")
            response: SMTPResponse = await proto.read_response(timeout=owner.cfg.data_timeout)
        except (aiosmtplib.SMTPException, ConnectionError) as e:
            conn.smtp.close()
            raise _unsure(where, e) from e
        if response.code != 250:
            owner._checkin(conn)  # the transaction is over either way; the session is clean
            raise owner._error(response, where, "DATA")
        return response

    def abort(self) -> None:
        """End the transaction without the dot: the connection is closed (never pooled)."""
        if not self.done:
            self.done = True
            self._conn.smtp.close()


def body_ascii(pieces: Sequence[wire.Piece], ascii: bool | None) -> bool:
    """Whether a message goes without BODY=8BITMIME: what the stamper worked out (``ascii``), else
    every piece US-ASCII, a view (no isascii()) counting as 8-bit, to be safe."""
    if ascii is not None:
        return ascii
    return all(not isinstance(p, memoryview) and p.isascii() for p in pieces)


def _group(mail_from: str, rcpts: Sequence[str], enc: str, opts: list[bytes]) -> list[bytes]:
    """MAIL, every RCPT and DATA as one RFC 2920 command group (:func:`command_group`'s lines)."""
    return [b" ".join([b"MAIL FROM:<" + mail_from.encode(enc) + b">", *opts]) + b"\r\n",
            *(b"RCPT TO:<" + r.encode(enc) + b">\r\n" for r in rcpts), b"DATA\r\n"]


def _unsure(where: str, e: Exception) -> TransientError:
    """What an error after the content went out means: the message may or may not have been
    taken, so a retry may deliver it twice, which we prefer to losing it (RFC 1047)."""
    if isinstance(e, aiosmtplib.SMTPTimeoutError):
        return TransientError(replies.ENDPOINT_TIMEOUT,
                              f"{where}: no reply to end of DATA (possible duplicate on retry)")
    return TransientError(replies.ENDPOINT_UNAVAILABLE, f"{where}: {e} during DATA (possible duplicate on retry)")


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a name: never trusted to be loopback


def _clean(data: bytes | bytearray | tuple[wire.Piece, ...], crlf: bool) -> bool:
    """Whether :func:`send_data` writes ``data`` itself: every line break CRLF (``crlf``: proved by
    the stamper; else checked, for one buffer) and a CRLF at the end. Pieces are only ever
    proved, never scanned."""
    if isinstance(data, tuple):
        last = next((p for p in reversed(data) if len(p)), b"")
        return crlf and bytes(last[-2:]) == b"\r\n"
    return data.endswith(b"\r\n") and (crlf or wire.crlf_only(data))


def _can_pipeline(smtp: aiosmtplib.SMTP, pieces: tuple[wire.Piece, ...], crlf: bool) -> bool:
    """RFC 2920 §3.1: only to a server that advertised PIPELINING; only for content that goes out
    on the fast path (:func:`_clean`, as :func:`send_data` decides it); only with the aiosmtplib
    internals :func:`command_group` relies on (else the sequential path, which needs none of them)."""
    proto = smtp.protocol
    if not smtp.supports_extension("pipelining") or proto is None or not all(
            hasattr(proto, a) for a in ("_command_lock", "_response_pending", "_response_waiter", "_buffer",
                                        "_read_response_from_buffer")):
        return False
    one = pieces[0] if len(pieces) == 1 else None
    return _clean(one if isinstance(one, (bytes, bytearray)) else pieces, crlf)


class _Replies(asyncio.Protocol):
    """What :func:`command_group` reads while its group is outstanding: every complete reply, parsed
    as it arrives with aiosmtplib's own parser and limits; a wake-up for the waiting task on each.

    It is the transport's protocol for that time (``transport.set_protocol``), and hands every
    other event (connection lost, EOF, flow control) to aiosmtplib's protocol. Assigning a
    ``data_received`` attribute on aiosmtplib's protocol instead would be lost on uvloop, whose
    transports look the method up once, when the protocol is set."""

    def __init__(self, proto: Any, expected: int) -> None:
        self.proto, self.expected = proto, expected
        self.got: list[SMTPResponse] = []
        self.failed: Exception | None = None
        self.wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.proto._buffer.extend(data)
        try:
            while len(self.got) < self.expected:
                r = self.proto._read_response_from_buffer()
                if r is None:
                    break
                self.got.append(r)
                if r.code == 421:  # RFC 5321 §3.8: the server is closing; nothing more will come
                    self.expected = len(self.got)
            if len(self.proto._buffer) > _MAX_REPLY:
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        except Exception as e:  # a malformed reply: aiosmtplib's own exception
            self.failed = e
        self.progress()

    def progress(self, _f: object = None) -> None:
        if not self.wake.done():
            self.wake.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.proto.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return bool(self.proto.eof_received())

    def pause_writing(self) -> None:
        self.proto.pause_writing()

    def resume_writing(self) -> None:
        self.proto.resume_writing()


async def command_group(smtp: aiosmtplib.SMTP, lines: Sequence[bytes], reply_timeout: float) -> list[SMTPResponse]:
    """Write ``lines`` (each a whole command with its CRLF) at once and read one reply per line, in
    order (an RFC 2920 command group). Fewer replies than lines: the server closed the connection
    (or said 421, it is closing) before answering the rest. ``reply_timeout`` bounds the wait for
    each next reply.

    aiosmtplib reads one reply per command it wrote and drops what arrives while a parsed reply
    waits to be picked up, so while the group is outstanding the transport's protocol is a
    :class:`_Replies`. Anything after the last expected reply is a protocol violation (the
    server talked out of turn): the connection is closed.
    """
    for line in lines:
        # aiosmtplib's guard against command injection (no control character inside a command).
        if not line.endswith(b"\r\n") or _CONTROL.search(line, 0, len(line) - 2):
            raise ValueError("Command contains a prohibited control character")
    proto: Any = smtp.protocol
    lost: asyncio.Future[SMTPResponse] | None = getattr(proto, "_response_waiter", None)  # ended on EOF/loss
    if proto is None or proto._command_lock is None or lost is None or lost.done():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    transport = proto.transport
    if transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    replies_ = _Replies(proto, len(lines))
    async with proto._command_lock:
        lost.add_done_callback(replies_.progress)
        transport.set_protocol(replies_)
        try:
            proto.write(b"".join(lines))
            while len(replies_.got) < replies_.expected and replies_.failed is None and not lost.done():
                replies_.wake = asyncio.get_running_loop().create_future()
                try:
                    await asyncio.wait_for(replies_.wake, reply_timeout)
                except TimeoutError:
                    raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from None
        finally:
            transport.set_protocol(proto)  # aiosmtplib's own again
            lost.remove_done_callback(replies_.progress)
    if replies_.failed is not None:
        raise replies_.failed
    if proto._buffer:
        smtp.close()
        raise aiosmtplib.SMTPResponseException(-1, "Unexpected data after the pipelined replies")
    return replies_.got


_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # aiosmtplib's COMMAND_INJECTION_REGEX
_MAX_REPLY = 8192 * 4  # aiosmtplib's MAX_RESPONSE_LENGTH


async def send_data(smtp: aiosmtplib.SMTP, data: bytes | tuple[wire.Piece, ...], reply_timeout: float, *,
                    crlf: bool = False, dotless: bool = False, started: bool = False) -> SMTPResponse:
    """``smtp.data(data)`` at C speed for CRLF-clean data (issue #14).

    aiosmtplib's DATA path runs two regular expressions over the whole message (line-ending
    normalisation, then dot-stuffing): about 15 ms per MB, a third of the relay's CPU on a large
    message. For data whose line ends are already all CRLF the first is a no-op, and dot-stuffing
    (RFC 5321 §4.5.2: one more dot before every line that starts with one) is ``bytes.replace`` on
    the pieces that need it (:func:`relay.wire.stuffed_pieces`); a large message is written piece
    by piece under the transport's flow control instead of being copied whole into its buffer.
    The exchange itself is aiosmtplib's ``execute_data_command`` (DATA, 354,
    content, final reply, under its command lock); anything else, or an aiosmtplib whose protocol
    object no longer has those parts, goes through ``smtp.data``. ``data`` in pieces (a big
    message as the stamper left it, :attr:`relay.mime.stamper.StampResult.pieces`) is written
    piece after piece when proved CRLF-only and dot-free, else joined first. ``started``: DATA
    was already sent and answered 354 (a pipelined group, :func:`command_group`); only the
    content and its final reply are left, and the content must be CRLF-clean.
    """
    proto = smtp.protocol
    lock = getattr(proto, "_command_lock", None)
    if isinstance(data, tuple) and not (crlf and dotless):
        data = wire.joined(data)
    # crlf: proved by the stamper from its splices (no 25 MB scan on the event loop); else checked.
    if proto is None or lock is None or not hasattr(proto, "_response_pending") or not _clean(data, crlf):
        if started:  # _can_pipeline() lets only clean content through: never reached
            raise aiosmtplib.SMTPDataError(-1, "content not CRLF-clean after a pipelined DATA")
        return await smtp.data(wire.joined(data) if isinstance(data, tuple) else data, timeout=reply_timeout)
    total = wire.size_of(data) if isinstance(data, tuple) else len(data)
    drain = getattr(proto, "_drain_helper", None)
    try:
        async with lock:
            if not started:
                proto._response_pending = True  # a reply is expected: nothing read is unsolicited
                proto.write(b"DATA\r\n")
                start = await proto.read_response(timeout=reply_timeout)
                if start.code != 354:
                    raise aiosmtplib.SMTPDataError(start.code, start.message)
            proto._response_pending = True
            # A big message goes in pieces, each written once the transport has room (its flow
            # control), so the transport never holds a second copy of the whole message.
            for piece in wire.stuffed_pieces(data, dotless=dotless and crlf):
                proto.write(piece)  # type: ignore[arg-type]  # any bytes-like object; asyncio copies what it keeps
                if drain is not None and total > wire.CHUNK:
                    try:
                        await asyncio.wait_for(drain(), reply_timeout)
                    except TimeoutError:
                        raise aiosmtplib.SMTPTimeoutError("Timed out writing message data") from None
            response = await proto.read_response(timeout=reply_timeout)
            if response.code != 250:
                raise aiosmtplib.SMTPDataError(response.code, response.message)
            return response
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise
