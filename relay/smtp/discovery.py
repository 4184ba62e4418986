"""aiosmtpd's per-connection method discovery, done once per class (issue #14).

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

import inspect as _inspect
import types
from collections.abc import Callable
from typing import Any

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
