"""The aiosmtpd server we run, with the few behaviours aiosmtpd gets wrong for a relay fixed.

* Banner and replies carry no software version (aiosmtpd's default ident is "Python SMTP x.y").
* During DATA, received bytes count as activity: aiosmtpd only re-arms its timeout on a valid
  command, so a large message over a slow link would be cut off mid-transfer.
* While the DATA handler works (inline delivery may legitimately wait 10 minutes for the
  tenant's final reply, RFC 5321 §4.5.3.2.6) the idle timer is held, otherwise aiosmtpd would
  close the connection and cancel the handler (aiosmtpd #110).
* Exceptions become 451 via :func:`relay.smtp.replies.reply_for`, never aiosmtpd's 500.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP

from relay.config import Listener


class RelaySMTP(SMTP):
    def __init__(self, handler: Any, *, hostname: str, idle_timeout: float, **kwargs: Any) -> None:
        super().__init__(
            handler, hostname=hostname, ident="ESMTP", timeout=idle_timeout,
            enable_SMTPUTF8=True, decode_data=False,
            # We relay for Exchange Online, which never authenticates: advertise no AUTH at all.
            auth_exclude_mechanism=["LOGIN", "PLAIN"], **kwargs,
        )
        self._in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # On an implicit-TLS listener the socket is TLS from the first byte; aiosmtpd only fills
        # session.ssl after STARTTLS, so record the TLS details the same way here.
        if self.session is not None and self.session.ssl is None:
            obj = transport.get_extra_info("ssl_object")
            if obj is not None:
                self.session.ssl = {"ssl_object": obj, "peercert": transport.get_extra_info("peercert"),
                                    "cipher": transport.get_extra_info("cipher")}

    async def smtp_DATA(self, arg: str) -> None:
        self._in_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self._in_data = False

    def data_received(self, data: bytes) -> None:
        if self._in_data:
            self._reset_timeout()
        super().data_received(data)

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
