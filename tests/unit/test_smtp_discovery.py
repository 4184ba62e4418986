"""relay/smtp/discovery.py: aiosmtpd builds the same method tables with the per-class cache as with
its own per-connection discovery (issue #14), bound to the right instances; a session set up once
per class (init_session) has every attribute aiosmtpd's own constructor gives it."""

from __future__ import annotations

import asyncio
import builtins
import collections
import inspect
import ssl
import types
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from relay.smtp import discovery
from relay.smtp.server import Guard, RelaySMTP


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop for sessions to be made on (they are never connected)."""
    lp = asyncio.new_event_loop()
    try:
        yield lp
    finally:
        lp.close()


class Handler:
    async def handle_DATA(self, *_a: Any) -> str:
        return "250 OK"

    async def handle_EHLO(self, _s: Any, _sess: Any, _env: Any, _hostname: str, responses: list[str]) -> list[str]:
        return responses

    async def auth_CUSTOM(self, *_a: Any) -> None:
        return None


def test_same_tables_as_aiosmtpds_own_discovery(loop: asyncio.AbstractEventLoop) -> None:
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


class PlainHandler:
    """A handler as the relay's and the dev sink's are: hooks, no AUTH mechanism."""

    async def handle_DATA(self, *_a: Any) -> str:
        return "250 OK"

    async def handle_EHLO(self, _s: Any, _sess: Any, _env: Any, _hostname: str, responses: list[str]) -> list[str]:
        return responses


def _norm(v: Any, smtp: Any, handler: Any) -> Any:
    """An attribute's value in a form two sessions can be compared by: bound methods by function
    and by whom they are bound to, readers by their limit, futures by state."""
    if isinstance(v, types.MethodType):
        who = "session" if v.__self__ is smtp else "handler" if v.__self__ is handler else v.__self__
        return ("method", v.__func__, who)
    if isinstance(v, Mapping):
        return {k: _norm(x, smtp, handler) for k, x in v.items()}
    if isinstance(v, asyncio.StreamReader):
        return ("reader", v._limit)  # type: ignore[attr-defined]
    if isinstance(v, weakref.ref):
        return ("weakref", type(v()))
    if isinstance(v, asyncio.Future):
        return ("future", v.done())
    if isinstance(v, collections.deque):
        return ("deque", list(v))
    return v


def _attributes(smtp: Any, handler: Any) -> dict[str, Any]:
    return {k: _norm(v, smtp, handler) for k, v in vars(smtp).items()}


def test_a_session_made_once_per_class_has_every_attribute_aiosmtpds_constructor_gives_it(
        monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for tls, limit in ((ctx, 1000), (None, None)):
        h = PlainHandler()

        guard = Guard()
        guard.max_line_length = 4096  # the DATA reader's StreamReader limit comes from it

        def make(h: PlainHandler = h, tls: ssl.SSLContext | None = tls, limit: int | None = limit,
                 guard: Guard = guard) -> RelaySMTP:
            return RelaySMTP(h, hostname="relay.test", loop=loop, idle_timeout=30, data_size_limit=limit,
                             tls_context=tls, require_starttls=tls is not None, guard=guard)

        fast = make()
        assert isinstance(fast._smtp_methods, discovery.Commands)  # this path, not aiosmtpd's
        with monkeypatch.context() as m:
            m.setattr(discovery, "MIRRORS", "another aiosmtpd")
            own = make()
        assert isinstance(own._smtp_methods, dict)  # aiosmtpd's own constructor
        got, want = _attributes(fast, h), _attributes(own, h)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == want[k], k
        assert fast._smtp_methods["DATA"].__self__ is fast
        assert fast._handle_hooks["DATA"].__self__ is h and fast._ehlo_hook_ver == "new"


def test_the_lazy_command_table_answers_as_aiosmtpds_dict(loop: asyncio.AbstractEventLoop) -> None:
    s = RelaySMTP(PlainHandler(), hostname="relay.test", loop=loop, idle_timeout=30)
    table = s._smtp_methods
    assert isinstance(table, discovery.Commands)
    want = {m[5:] for m in builtins.dir(s) if m.startswith("smtp_")}
    assert set(table) == want and len(table) == len(want)
    assert table.get("NOSUCH") is None and table.get("NOSUCH", 1) == 1 and "NOSUCH" not in table
    assert table.get("DATA") is table["DATA"] and table["DATA"] == s.smtp_DATA
    assert {k: f.__func__ for k, f in table.items()} == {k: getattr(type(s), "smtp_" + k) for k in want}
    with pytest.raises(KeyError):
        table["NOSUCH"]


def test_a_handler_with_auth_mechanisms_gets_aiosmtpds_own_constructor(loop: asyncio.AbstractEventLoop) -> None:
    s = RelaySMTP(Handler(), hostname="relay.test", loop=loop, idle_timeout=30)
    assert isinstance(s._smtp_methods, dict) and "CUSTOM" in s._auth_methods
