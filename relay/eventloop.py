"""Which asyncio event loop serves: the standard one, or uvloop (libuv, in C) when it is there.

Each message takes some twenty trips round the event loop (one or two per SMTP command and reply,
in and out), and uvloop's are cheaper. Measured on the 2-core benchmark machine (issue #14,
``benchmarks/loop_ab.py``, the two loops side by side in the same run): at a fixed rate of 400
10 KB messages/s, one per connection, uvloop's relay spent 0.85x, 0.92x, 0.92x and 0.94x
asyncio's CPU per message in four runs, and was lower in every round of the 6-round one. Flat out
(20 sessions, many connections ready at each trip) it was 0.92x, 1.04x, 1.05x and 1.10x in
plaintext: no gain there, rather a few per cent more, and ``--workers`` is the lever; with STARTTLS
on both sides, as in production, 0.95x (``benchmarks/relay_ab.py --tls``). Exchange Online's load is the
first kind: bursts, most of the time far below saturation, where CPU per message and latency are
what an operator sees.

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


def choose(choice: str, *, implicit_tls: bool = False) -> str:
    """What ``choice`` (and whether any listener is implicit TLS) gives here: "uvloop 0.23.0" or
    "asyncio" (`check` says it; `serve` installs it)."""
    if choice not in CHOICES:
        raise ValueError(f"event loop {choice!r}: one of {', '.join(CHOICES)}")
    if choice == "uvloop" and implicit_tls:
        raise ValueError("uvloop cannot serve an implicit-TLS listener")
    if choice == "asyncio" or (choice == "auto" and (implicit_tls or not available())):
        return "asyncio"
    return f"uvloop {importlib.metadata.version('uvloop')}"


def install(choice: str, *, implicit_tls: bool = False) -> str:
    """Set the event loop policy for ``asyncio.run`` as :func:`choose` says; returns its answer."""
    name = choose(choice, implicit_tls=implicit_tls)
    if name == "asyncio":
        asyncio.set_event_loop_policy(None)  # the default policy
    else:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return name
