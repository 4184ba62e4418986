"""The aiosmtpd server we run, with the few behaviours aiosmtpd gets wrong for a relay fixed.

* Banner and replies carry no software version (aiosmtpd's default ident is "Python SMTP x.y").
* During DATA, received bytes count as activity: aiosmtpd only re-arms its timeout on a valid
  command, so a large message over a slow link would be cut off mid-transfer.
* While the DATA handler works (inline delivery may legitimately wait 10 minutes for the
  tenant's final reply, RFC 5321 §4.5.3.2.6) the idle timer is held, otherwise aiosmtpd would
  close the connection and cancel the handler (aiosmtpd #110).
* Exceptions become 451 via :func:`relay.smtp.replies.reply_for`, never aiosmtpd's 500.

And the connection-level protections of issue #5, enforced by a :class:`Guard` shared by all
sessions of a listener: allowed networks (554 greeting), total and per-IP connection caps
(421), pregreet ("early talker") detection, an error budget, a minimum DATA rate against
slowloris senders, and a DATA line length limit above RFC 5321's 1000 so that mail Exchange
Online accepted is never refused for a long line.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP

from relay.config import Listener, Network, SecurityConfig

log = logging.getLogger("relay.smtp")


@dataclass
class Guard:
    """Connection admission and per-session budgets, shared by every session of a server."""

    allowed: tuple[Network, ...] = ()  # empty: anyone may connect (the dev sink)
    max_connections: int = 1_000_000
    max_per_ip: int = 1_000_000
    max_errors: int = 1_000_000
    min_data_rate: float = 0.0
    greeting_delay: float = 0.0
    max_line_length: int = 1001
    active: int = 0
    per_ip: collections.Counter[str] = field(default_factory=collections.Counter)

    def configure(self, sec: SecurityConfig) -> None:
        """Take the limits of a (new) security configuration; the live counters are kept."""
        self.allowed, self.max_connections, self.max_per_ip = (
            sec.allowed_networks, sec.max_connections, sec.max_connections_per_ip)
        self.max_errors, self.min_data_rate, self.greeting_delay = sec.max_errors, sec.min_data_rate, sec.greeting_delay
        self.max_line_length = sec.max_line_length

    def admit(self, ip: str | None) -> str | None:
        """None to admit, else the reply to greet with before closing (RFC 5321 §3.1: 554)."""
        if self.allowed:
            try:
                addr = ipaddress.ip_address((ip or "").split("%")[0])
            except ValueError:
                return "554 5.7.1 Connection refused"
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            if not any(addr in n for n in self.allowed):
                log.warning("refused connection from %s: not in allowed networks", ip)
                return "554 5.7.1 Connection refused: not an allowed network"
        if self.active >= self.max_connections:
            return "421 4.7.0 Too many connections, try again later"
        if self.per_ip[ip or ""] >= self.max_per_ip:
            return "421 4.7.0 Too many connections from your address, try again later"
        return None


class RelaySMTP(SMTP):
    def __init__(self, handler: Any, *, hostname: str, idle_timeout: float, guard: Guard | None = None,
                 **kwargs: Any) -> None:
        self.guard = guard or Guard()
        # aiosmtpd sizes its StreamReader from this attribute in __init__: set it first.
        self.line_length_limit = self.guard.max_line_length
        super().__init__(
            handler, hostname=hostname, ident="ESMTP", timeout=idle_timeout,
            enable_SMTPUTF8=True, decode_data=False,
            # We relay for Exchange Online, which never authenticates: advertise no AUTH at all.
            auth_exclude_mechanism=["LOGIN", "PLAIN"], **kwargs,
        )
        self._in_data = False
        self._data_t0 = 0.0
        self._data_bytes = 0
        self._errors = 0
        self._rejection: str | None = None
        self._admitted_ip: str | None = None
        self._idle = idle_timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else None
        if self._admitted_ip is None and self._rejection is None:  # not again after STARTTLS
            self._rejection = self.guard.admit(ip)
            if self._rejection is None:
                self._admitted_ip = ip or ""
                self.guard.active += 1
                self.guard.per_ip[self._admitted_ip] += 1
        super().connection_made(transport)
        # On an implicit-TLS listener the socket is TLS from the first byte; aiosmtpd only fills
        # session.ssl after STARTTLS, so record the TLS details the same way here.
        if self.session is not None and self.session.ssl is None:
            obj = transport.get_extra_info("ssl_object")
            if obj is not None:
                self.session.ssl = {"ssl_object": obj, "peercert": transport.get_extra_info("peercert"),
                                    "cipher": transport.get_extra_info("cipher")}

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted_ip is not None:
            self.guard.active -= 1
            self.guard.per_ip[self._admitted_ip] -= 1
            if self.guard.per_ip[self._admitted_ip] <= 0:
                del self.guard.per_ip[self._admitted_ip]
            self._admitted_ip = None
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self._rejection is not None:
            await self.push(self._rejection)
            self._close()
            return
        if self.guard.greeting_delay:
            # Pregreet test: a legitimate client waits for the banner (RFC 5321 §3.1); one that
            # talks first is a spambot or a smuggling probe.
            await asyncio.sleep(self.guard.greeting_delay)
            if self._reader._buffer:  # type: ignore[attr-defined]
                log.warning("%r talked before the greeting", self.session.peer if self.session else None)
                await self.push("554 5.5.1 Protocol error: talking before the greeting")
                self._close()
                return
        await super()._handle_client()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: Any) -> None:
        await super().push(status)
        line = status if isinstance(status, str) else status.decode("ascii", "replace")
        if line[:1] in ("4", "5") and not line.startswith("421"):
            self._errors += 1
            if self._errors >= self.guard.max_errors:
                await super().push("421 4.7.0 Too many errors, closing connection")
                self._close()

    async def smtp_DATA(self, arg: str) -> None:
        self._in_data = True
        self._data_t0 = time.monotonic()
        self._data_bytes = 0
        try:
            await super().smtp_DATA(arg)
        finally:
            self._in_data = False

    def data_received(self, data: bytes) -> None:
        if self._in_data:
            self._reset_timeout()
            self._data_bytes += len(data)
            elapsed = time.monotonic() - self._data_t0
            # Slowloris: after a grace period the average rate must reach min_data_rate.
            if self.guard.min_data_rate and elapsed > min(30.0, self._idle) and \
                    self._data_bytes / elapsed < self.guard.min_data_rate:
                log.warning("%r DATA too slow: %d bytes in %.0f s", self.session.peer if self.session else None,
                            self._data_bytes, elapsed)
                if isinstance(self.transport, asyncio.WriteTransport):
                    self.transport.write(b"421 4.4.2 Data rate too low, closing connection\r\n")
                self._close()
                return
        super().data_received(data)

    def _timeout_cb(self) -> None:
        # A client that sends STARTTLS and then nothing (or never finishes the handshake) leaves
        # aiosmtpd's session task waiting forever: asyncio's SSLProtocol only reports
        # connection_lost to us once the handshake completed. Clean up ourselves.
        pending_tls = self._original_transport is not None and (self.session is None or self.session.ssl is None)
        super()._timeout_cb()  # type: ignore[no-untyped-call]
        if pending_tls and self._admitted_ip is not None:
            self.connection_lost(None)

    def hold_timeout(self, seconds: float) -> None:
        """Keep the connection for ``seconds`` while a handler works (see module doc)."""
        self._reset_timeout(seconds)


class EhloWithoutAuth:
    """Handler mixin: aiosmtpd advertises "250-AUTH" after STARTTLS even with no mechanisms
    enabled. Exchange Online never authenticates to a smart host, so we advertise no AUTH."""

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [r for r in responses if not r[4:].upper().startswith("AUTH")]


async def start_listener(
    factory: Callable[[], SMTP], listener: Listener, tls_context: ssl.SSLContext | None,
) -> asyncio.Server:
    """Bind one listener. Implicit TLS wraps the socket; STARTTLS listeners get plain TCP."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        factory, host=listener.host, port=listener.port,
        ssl=tls_context if listener.implicit_tls else None,
        reuse_address=True,
    )
