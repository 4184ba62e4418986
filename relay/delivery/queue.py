"""Queue mode: deliver spooled copies with retries, bounce what expires (never a bounce for a
bounce), and pick up whatever a crash or restart left in the spool."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import heapq
import logging
from collections.abc import Callable

from relay import replies
from relay.config import Config
from relay.delivery import dsn
from relay.delivery.client import Delivery
from relay.delivery.spool import Entry, Spool, backoff, now
from relay.errors import PermanentError, TransientError

log = logging.getLogger("relay.queue")


class QueueRunner:
    def __init__(self, spool: Spool, delivery: Callable[[], Delivery], cfg: Callable[[], Config],
                 concurrency: int = 4) -> None:
        self.spool = spool
        self._delivery = delivery
        self._cfg = cfg
        self._heap: list[tuple[float, str]] = []
        self._entries: dict[str, Entry] = {}
        self._wake = asyncio.Event()
        self._sem = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for e in await asyncio.to_thread(self.spool.prepare):
            self._schedule(e)
        if self._entries:
            log.info("queue: %d message cop(ies) waiting in %s", len(self._entries), self.spool.root)
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for t in list(self._running):
            t.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._entries)

    async def enqueue(self, entries: list[tuple[Entry, bytes]]) -> None:
        """Commit all copies of one message, or none (then raise OSError: the caller answers 4xx)."""
        done: list[Entry] = []
        try:
            for e, data in entries:
                await asyncio.to_thread(self.spool.put, e, data)
                done.append(e)
        except OSError:
            for e in done:  # no half-accepted message: the client retries the whole of it
                await asyncio.to_thread(self.spool.remove, e)
            raise
        for e, _ in entries:
            self._schedule(e)

    def _schedule(self, e: Entry) -> None:
        self._entries[e.id] = e
        heapq.heappush(self._heap, (e.next_attempt, e.id))
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            t = now()
            while self._heap and self._heap[0][0] <= t:
                _, eid = heapq.heappop(self._heap)
                e = self._entries.get(eid)
                if e is None or e.next_attempt > t:
                    continue  # rescheduled or gone; a newer heap item stands for it
                task = asyncio.create_task(self._attempt(e))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            timeout = max(0.0, self._heap[0][0] - now()) if self._heap else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _attempt(self, e: Entry) -> None:
        async with self._sem:
            cfg = self._cfg()
            tenant = cfg.tenant_by_name(e.tenant)
            e.attempts += 1
            try:
                if tenant is None:  # a reload removed it: keep the mail until it expires
                    raise TransientError(replies.LOCAL_ERROR, f"tenant {e.tenant} unknown")
                data = await asyncio.to_thread(self.spool.data, e)
                outcome = await self._delivery().deliver(tenant, e.mail_from, e.rcpts, data, smtputf8=e.smtputf8)
            except PermanentError as err:
                log.warning("queue %s: refused for good: %s", e.id, err.detail)
                await self._bounce(e, {r: dsn.Refusal(err.reply.code, f"{err.reply.enhanced} {err.reply.text}",
                                                      "tenant endpoint") for r in e.rcpts})
                await self._done(e)
                return
            except TransientError as err:
                e.last_error = err.detail
                if now() - e.created >= cfg.delivery.lifetime:
                    log.error("queue %s: giving up after %d attempts: %s", e.id, e.attempts, err.detail)
                    await self._bounce(e, {r: dsn.Refusal(451, f"4.4.7 Delivery time expired: {err.reply.text}",
                                                          "tenant endpoint") for r in e.rcpts})
                    await self._done(e)
                    return
                e.next_attempt = now() + backoff(e.attempts, cfg.delivery.retry_min, cfg.delivery.retry_max)
                await asyncio.to_thread(self.spool.update, e)
                log.info("queue %s: attempt %d deferred (%s); next in %.0f s", e.id, e.attempts, err.detail,
                         e.next_attempt - now())
                self._schedule(e)
                return
            log.info("queue %s: delivered to %s after %d attempt(s): %s", e.id, outcome.endpoint, e.attempts,
                     outcome.reply[:120])
            if outcome.refused:
                await self._bounce(e, dict(outcome.refused))
            await self._done(e)

    async def _done(self, e: Entry) -> None:
        self._entries.pop(e.id, None)
        await asyncio.to_thread(self.spool.remove, e)

    async def _bounce(self, e: Entry, refused: dict[str, dsn.Refusal]) -> None:
        """Queue a DSN to the sender — never for a null-sender message (a bounce of a bounce)."""
        if not e.mail_from:
            log.warning("queue %s: not bouncing a null-sender message; %d recipient(s) failed", e.id, len(refused))
            return
        cfg = self._cfg()
        original = await asyncio.to_thread(self.spool.data, e)
        body = dsn.build(original=original, mail_from=e.mail_from, refused=refused, reporting_mta=cfg.hostname,
                         queue_id=e.id, arrival=dt.datetime.fromtimestamp(e.created, dt.UTC),
                         processed_header=cfg.processed_header)
        t = now()
        bounce = Entry(id=f"{e.id}-dsn", tenant=e.tenant, mail_from="", rcpts=[e.mail_from], smtputf8=False,
                       created=t, next_attempt=t)
        try:
            await self.enqueue([(bounce, body)])
        except OSError as err:
            log.error("queue %s: DSN could not be queued (%s); failed recipients: %s", e.id, err, ", ".join(refused))
