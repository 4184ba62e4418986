"""Whole-message work on big messages, off the event loop and one message at a time, and the
process's memory settings for big messages and short collector pauses (issue #14).

The steps are CPU work under the GIL (bytes searches, copies, the stamper), so threads give no
parallelism; what they give is an event loop that keeps serving other sessions. One worker
thread, not asyncio's default pool of up to 32: with four 25 MB messages in four threads the loop
thread competes with four GIL holders instead of one, and every small message waits that much
longer. More cores are used with ``serve --workers N`` (processes).
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="big-message")
# Whole-message work on a message over this size runs in the thread, not on the event loop: a
# 25 MB message costs tens of ms per pass, which every other session would wait for (aiosmtpd
# #293). Below it the hop to the thread costs more than the work.
OFFLOAD_BYTES = 256 * 1024


async def run(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in the big-message thread (with the caller's context, as asyncio.to_thread)."""
    ctx = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(ctx.run, fn, *args))


async def run_sized(size: int, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)``: in the big-message thread for a message of over :data:`OFFLOAD_BYTES`
    (``size``), else right here on the event loop."""
    return await run(fn, *args) if size > OFFLOAD_BYTES else fn(*args)


M_MMAP_THRESHOLD = -3  # mallopt(3)


def release_big_buffers(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations over ``threshold`` from mmap, so a big message's buffers go
    back to the system when it is done (mallopt(3), ``M_MMAP_THRESHOLD``).

    By default glibc raises that threshold after the first big free (up to 32 MiB), so from the
    second 25 MB message on its copies come from the heap, and the process keeps the high-water
    mark: 25-30 % more peak RSS in the benchmark. Fixing it costs page faults on fresh buffers
    (about 40 ms of CPU on a 25 MB message) for a resident size that follows the messages in
    flight, which is what container memory limits need. Returns False where there is no glibc
    ``mallopt``, changing nothing (musl maps big allocations itself and unmaps them when freed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def settle_heap() -> None:
    """Take everything alive now (modules, configuration, templates, the directory) out of the
    cyclic garbage collector's walks (:func:`gc.freeze`), after one last collection.

    A full (generation 2) collection walks every tracked object; with the configuration loaded it
    paused the event loop for 17-35 ms under load, which is what a p99 latency sees. Frozen, those
    pauses measured 3-4 ms. Called once serving has started and after every reload: it unfreezes
    first, so a configuration replaced by the reload can still be collected (a frozen cycle never
    would be)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
