"""aiosmtpd's per-connection set-up, done once per class (issue #14): its method discovery, and (below)
the rest of its constructor.

``aiosmtpd.smtp.SMTP.__init__`` runs, for every connection, ``inspect.getmembers()`` on the
session and on the handler (to find ``auth_*`` methods), ``dir()`` on both (``handle_*`` hooks,
``smtp_*`` commands) and ``inspect.signature()`` on the EHLO hook: about 0.2 ms of the ~2 ms a
10 KB message costs the relay (py-spy, benchmarks/e2e.py). The answers depend only on the classes,
so :func:`install` gives aiosmtpd's module a ``dir`` and an ``inspect`` that remember them per class.
aiosmtpd still looks every name up on the instance itself and filters by the same prefixes (the
cached names are already only those), so it builds exactly the same tables
(``tests/unit/test_smtp_discovery.py`` compares them). The one difference: a
``handle_*``/``smtp_*``/``auth_*`` attribute set on an *instance* rather than defined on its class
would not be seen — aiosmtpd's own documentation defines them as methods.
"""

from __future__ import annotations

import asyncio
import inspect as _inspect
import logging
import ssl
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import aiosmtpd
import aiosmtpd.smtp as _a

_dirs: dict[type, list[str]] = {}
_signatures: dict[Any, _inspect.Signature] = {}


# The only prefixes aiosmtpd looks for in what dir() returns (``handle_`` hooks, ``smtp_`` commands;
# ``auth_`` through getmembers below).
_PREFIXES = ("handle_", "smtp_", "auth_")


def class_dir(obj: Any) -> list[str]:
    """``dir(obj)`` as aiosmtpd uses it: only the names it filters for (``_PREFIXES``), so the
    comprehensions it runs per connection go over a dozen names instead of a few hundred."""
    cls = type(obj)
    names = _dirs.get(cls)
    if names is None:
        names = _dirs[cls] = [n for n in dir(cls) if n.startswith(_PREFIXES)]
    return names


def getmembers(obj: Any, predicate: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """What aiosmtpd uses getmembers for: the (name, bound member) pairs of ``obj``'s class
    members, bound on ``obj`` — only those named ``auth_*``, the only ones it keeps."""
    if predicate is not None:
        return _inspect.getmembers(obj, predicate)
    return [(n, getattr(obj, n)) for n in class_dir(obj) if n.startswith("auth_") and hasattr(obj, n)]


def signature(f: Any) -> _inspect.Signature:
    key = (getattr(f, "__func__", f), isinstance(f, types.MethodType))
    sig = _signatures.get(key)
    if sig is None:
        sig = _signatures[key] = _inspect.signature(f)
    return sig


class _Inspect:
    """``inspect`` as aiosmtpd's module sees it: the cached parts, the rest delegated."""

    getmembers = staticmethod(getmembers)
    signature = staticmethod(signature)

    def __getattr__(self, name: str) -> Any:
        return getattr(_inspect, name)


def install(module: types.ModuleType) -> None:
    module.inspect = _Inspect()  # type: ignore[attr-defined]
    module.dir = class_dir  # type: ignore[attr-defined]  # module globals come before builtins


# --- the rest of aiosmtpd's per-connection set-up, once per class and handler ----------------------
#
# With discovery cached, SMTP.__init__ still cost about 54 µs a connection (4 % of a 10 KB message
# at one message per connection): binding every smtp_* method and handle_* hook to build tables of
# which a session uses five entries, the AUTH table the relay then empties, ``SSLContext.verify_mode``
# and an INFO log call that the relay's level drops. :func:`init_session` sets exactly the attributes
# aiosmtpd's constructor sets, for the arguments :class:`relay.smtp.server.RelaySMTP` passes, from
# tables computed once; ``tests/unit/test_smtp_discovery.py`` compares every attribute with what
# aiosmtpd's own constructor makes. It mirrors aiosmtpd's code, so it is used only with the version
# it was written against (:data:`MIRRORS`); any other version gets aiosmtpd's own constructor.

MIRRORS = "1.4.6"


class Commands(Mapping[str, Any]):
    """aiosmtpd's ``_smtp_methods`` for one session (command name -> bound ``smtp_*`` method),
    each method bound when first asked for. aiosmtpd reads it with ``get`` (every command, and
    HELP) and ``items`` (HELP without an argument)."""

    __slots__ = ("_bound", "_names", "_smtp")

    def __init__(self, smtp: Any, names: tuple[str, ...]) -> None:
        self._smtp, self._names = smtp, names
        self._bound: dict[str, Any] = {}

    def get(self, name: str, default: Any = None) -> Any:
        m = self._bound.get(name)
        if m is None:
            if name not in self._names:
                return default
            m = self._bound[name] = getattr(self._smtp, "smtp_" + name)
        return m

    def __getitem__(self, name: str) -> Any:
        m = self.get(name)
        if m is None:
            raise KeyError(name)
        return m

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_commands: dict[type, tuple[str, ...]] = {}
_handlers: dict[int, tuple[Any, dict[str, Callable[..., Any]], str | None, bool]] = {}
_auth_builtin: dict[tuple[type, frozenset[str]], bool] = {}
_checked_contexts: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()


def _handler_tables(handler: Any) -> tuple[dict[str, Callable[..., Any]], str | None, bool]:
    """The handler's ``handle_*`` hooks (bound: one handler serves every session) and its EHLO
    hook's version, as aiosmtpd's constructor works them out, and whether it has ``auth_*``
    methods."""
    got = _handlers.get(id(handler))
    if got is None or got[0] is not handler:
        hooks = {m.replace("handle_", ""): getattr(handler, m) for m in class_dir(handler) if m.startswith("handle_")}
        ehlo, ver = hooks.get("EHLO"), None
        if ehlo is not None:
            n = len(signature(ehlo).parameters)
            if n not in (4, 5):
                raise RuntimeError("Unsupported EHLO Hook")
            ver = "old" if n == 4 else "new"
        if len(_handlers) > 64:  # handlers are made once per service; a test suite makes many
            _handlers.clear()
        got = _handlers[id(handler)] = (handler, hooks, ver, any(n.startswith("auth_") for n in class_dir(handler)))
    return got[1], got[2], got[3]


# The keyword arguments of aiosmtpd's constructor that init_session() handles (any other one, or
# an AUTH-related one, goes to aiosmtpd's own constructor).
_HANDLED = frozenset({"hostname", "ident", "timeout", "data_size_limit", "enable_SMTPUTF8", "decode_data",
                      "tls_context", "require_starttls", "auth_exclude_mechanism", "loop"})


def init_session(smtp: Any, handler: Any, kw: Mapping[str, Any]) -> bool:
    """Set ``smtp`` up as ``aiosmtpd.smtp.SMTP.__init__(smtp, handler, **kw)`` would, or return
    False (nothing done) when it cannot: another aiosmtpd, an argument it does not handle, no
    running loop given, AUTH mechanisms to offer (then the caller runs aiosmtpd's own)."""
    if (aiosmtpd.__version__ != MIRRORS or not kw.keys() <= _HANDLED or kw.get("loop") is None
            or kw.get("decode_data") or not kw.get("hostname")):
        return False
    hooks, ehlo_ver, handler_auth = _handler_tables(handler)
    if handler_auth:
        return False  # the handler offers AUTH mechanisms: aiosmtpd's own tables
    cls = type(smtp)
    excluded = frozenset(kw.get("auth_exclude_mechanism") or ())
    builtin_only = _auth_builtin.get((cls, excluded))
    if builtin_only is None:
        mechs = {getattr(getattr(cls, n), "__auth_mechanism_name__", n.replace("auth_", "").replace("__", "-"))
                 for n in class_dir(smtp) if n.startswith("auth_")}
        builtin_only = _auth_builtin[(cls, excluded)] = mechs <= excluded
    if not builtin_only:
        return False  # the session class offers AUTH: aiosmtpd's own tables
    loop: asyncio.AbstractEventLoop = kw["loop"]
    tls_context: ssl.SSLContext | None = kw.get("tls_context")
    smtp.__ident__ = kw.get("ident") or _a.__ident__
    smtp.loop = loop
    asyncio.StreamReaderProtocol.__init__(smtp, asyncio.StreamReader(loop=loop, limit=smtp.line_length_limit),
                                          client_connected_cb=smtp._cb_client_connected, loop=loop)
    smtp.event_handler = handler
    smtp.data_size_limit = kw.get("data_size_limit", _a.DATA_SIZE_DEFAULT)
    smtp.enable_SMTPUTF8 = kw.get("enable_SMTPUTF8", False)
    smtp._decode_data = False
    smtp.command_size_limits.clear()
    smtp.hostname = kw["hostname"]
    smtp.tls_context = tls_context
    if tls_context is not None and tls_context not in _checked_contexts:
        # aiosmtpd's warnings about a context that asks for client certificates or names, once
        # per context instead of once per connection.
        if tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
            _a.log.warning("tls_context.verify_mode not in {CERT_NONE, CERT_OPTIONAL}; "
                           "this might cause client connection problems")
        elif tls_context.check_hostname:
            _a.log.warning("tls_context.check_hostname == True; this might cause client connection problems")
        _checked_contexts.add(tls_context)
    smtp.require_starttls = tls_context and kw.get("require_starttls", False)
    smtp._timeout_duration = kw.get("timeout", 300)
    smtp._timeout_handle = None
    smtp._tls_handshake_okay = True
    smtp._tls_protocol = None
    smtp._original_transport = None
    smtp.session = None
    smtp.envelope = None
    smtp.transport = None
    smtp._handler_coroutine = None
    smtp._auth_require_tls = True
    smtp._proxy_timeout = None
    smtp._authenticator = None
    smtp._auth_callback = _a.login_always_fail
    smtp._auth_required = False
    smtp._auth_methods = {}
    if _a.log.isEnabledFor(logging.INFO):
        _a.log.info("Available AUTH mechanisms: ")
    smtp._ehlo_hook_ver = ehlo_ver
    smtp._handle_hooks = dict(hooks)
    if smtp._ehlo_hook_ver == "old":
        warnings.warn("Use the 5-argument handle_EHLO() hook instead of the 4-argument handle_EHLO() hook; "
                      "support for the 4-argument handle_EHLO() hook will be removed in version 2.0",
                      DeprecationWarning, stacklevel=2)
    names = _commands.get(cls)
    if names is None:
        names = _commands[cls] = tuple(m.replace("smtp_", "") for m in class_dir(smtp) if m.startswith("smtp_"))
    smtp._smtp_methods = Commands(smtp, names)
    smtp._enforce_call_limit = False
    return True
