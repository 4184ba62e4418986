"""relay/smtp/discovery.py: aiosmtpd builds the same method tables with the per-class cache as with
its own per-connection discovery (issue #14), bound to the right instances."""

from __future__ import annotations

import asyncio
import builtins
import inspect
from typing import Any

from aiosmtpd.smtp import SMTP

from relay.smtp.server import RelaySMTP


class Handler:
    async def handle_DATA(self, *_a: Any) -> str:
        return "250 OK"

    async def handle_EHLO(self, _s: Any, _sess: Any, _env: Any, _hostname: str, responses: list[str]) -> list[str]:
        return responses

    async def auth_CUSTOM(self, *_a: Any) -> None:
        return None


def test_same_tables_as_aiosmtpds_own_discovery() -> None:
    loop = asyncio.new_event_loop()
    try:
        for cls in (RelaySMTP, SMTP):
            h = Handler()

            def make(cls: type[SMTP] = cls, h: Handler = h) -> SMTP:
                if cls is RelaySMTP:
                    return RelaySMTP(h, hostname="x", loop=loop, idle_timeout=30)
                return SMTP(h, hostname="x", loop=loop)

            a, b = make(), make()
            # what aiosmtpd's __init__ would find with the real dir() and inspect.getmembers()
            want_smtp = {m[5:] for m in builtins.dir(a) if m.startswith("smtp_")}
            want_hooks = {m[7:] for m in builtins.dir(h) if m.startswith("handle_")}
            want_auth = {getattr(f, "__auth_mechanism_name__", m.replace("auth_", "").replace("__", "-"))
                         for o in (a, h) for m, f in inspect.getmembers(o) if m.startswith("auth_")}
            excluded = {"LOGIN", "PLAIN"} if cls is RelaySMTP else set()
            assert set(a._smtp_methods) == want_smtp and "DATA" in want_smtp
            assert set(a._handle_hooks) == want_hooks == {"DATA", "EHLO"}
            assert set(a._auth_methods) == want_auth - excluded and "CUSTOM" in want_auth
            assert a._ehlo_hook_ver == "new"
            # bound to each session, not to the first one the cache saw
            assert a._smtp_methods["DATA"].__self__ is a and b._smtp_methods["DATA"].__self__ is b
            assert a._handle_hooks["DATA"].__self__ is h
    finally:
        loop.close()
