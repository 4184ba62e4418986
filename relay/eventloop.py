"""Which asyncio event loop serves: the standard one, or uvloop (libuv, in C) when it is there.

Measured on the 2-core benchmark machine (issue #14, ``benchmarks/loop_ab.py``), the same relay
at a fixed rate of one 10 KB message per connection spent 16-21 % less CPU per message on uvloop,
because each message takes some twenty trips round the event loop (one or two per SMTP command and
reply) and uvloop's are cheaper. Flat out, with many sessions per loop trip, both loops cost the
same. Exchange Online's load is the first kind: bursts, most of the time far below saturation.

``auto`` (the default) takes uvloop when it can be imported and no listener is implicit TLS,
else asyncio's own loop; ``asyncio`` and ``uvloop`` insist (the latter is a configuration error
where it is not installed, or with an implicit-TLS listener).

Why not uvloop with implicit TLS: the implicit-TLS listener decides admission first and only then
starts TLS on the connection (``relay.smtp.server.TlsGate``, ``loop.start_tls``). uvloop starts
reading as soon as the connection is made, even when the protocol pauses reading in
``connection_made``, so the client's ClientHello is handed to the gate as application data before
``start_tls`` can take it and the handshake never completes (measured with uvloop 0.23).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util

CHOICES = ("auto", "asyncio", "uvloop")


def available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def install(choice: str, *, implicit_tls: bool = False) -> str:
    """Set the event loop policy for ``asyncio.run`` according to ``choice`` (and whether any
    listener is implicit TLS); returns what serves, for the log ("uvloop 0.23.0" or "asyncio")."""
    if choice not in CHOICES:
        raise ValueError(f"event loop {choice!r}: one of {', '.join(CHOICES)}")
    if choice == "uvloop" and implicit_tls:
        raise ValueError("uvloop cannot serve an implicit-TLS listener")
    if choice == "asyncio" or (choice == "auto" and (implicit_tls or not available())):
        asyncio.set_event_loop_policy(None)  # the default policy
        return "asyncio"
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return f"uvloop {importlib.metadata.version('uvloop')}"
