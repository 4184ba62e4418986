"""Queue mode: deliver spooled copies with retries, bounce what expires (never a bounce for a
bounce), and pick up whatever a crash or restart left in the spool.

The runner contains its own failures (issue #12): an unexpected exception while attempting an
entry (an OSError writing its metadata, a bug) reschedules it with backoff, and after
``MAX_FAULTS`` in a row moves it to ``hold/`` with the reason — like Mailman's shunt queue. A
periodic rescan of the spool picks up any committed entry the in-memory schedule does not know,
so nothing held only in memory can strand a message. An entry is never attempted twice at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import heapq
import logging
from collections.abc import Callable, Sequence

from relay import replies
from relay.config import Config
from relay.delivery import dsn
from relay.delivery.client import Delivery
from relay.delivery.spool import Entry, Spool, backoff, now
from relay.errors import PermanentError, TransientError

log = logging.getLogger("relay.queue")
MAX_FAULTS = 3  # unexpected failures in a row before an entry is held for an operator


class QueueRunner:
    def __init__(self, spool: Spool, delivery: Callable[[], Delivery], cfg: Callable[[], Config],
                 concurrency: int = 4, rescan: float = 60.0) -> None:
        self.spool = spool
        self._delivery = delivery
        self._cfg = cfg
        self._heap: list[tuple[float, str]] = []
        self._entries: dict[str, Entry] = {}
        self._wake = asyncio.Event()
        self._sem = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._inflight: set[str] = set()  # being attempted now
        self._pending: set[str] = set()  # being written by enqueue, not yet scheduled
        self._faults: dict[str, int] = {}
        self._finished: set[str] = set()  # delivered, but the files could not be removed
        self._rescan_every = rescan
        self._rescan_task: asyncio.Task[None] | None = None
        self.started = False
        self._start_lock = asyncio.Lock()

    async def ensure_started(self) -> None:
        """Start on first use (inline mode spools only the DSNs it could not send)."""
        async with self._start_lock:
            if not self.started:
                await self.start()

    async def start(self) -> None:
        for e in await asyncio.to_thread(self.spool.prepare):
            self._schedule(e)
        if self._entries:
            log.info("queue: %d message cop(ies) waiting in %s", len(self._entries), self.spool.root)
        self._task = asyncio.create_task(self._loop())
        self._rescan_task = asyncio.create_task(self._rescan_loop())
        self.started = True

    async def stop(self, grace: float = 10.0) -> None:
        """Stop between attempts: no new ones start; those running get ``grace`` seconds to end
        (a cancelled one stays in the spool and is retried at the next start)."""
        for task in (self._task, self._rescan_task):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._running:
            await asyncio.wait(list(self._running), timeout=grace)
        for t in list(self._running):
            t.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        self.started = False

    def __len__(self) -> int:
        return len(self._entries)

    async def enqueue(self, entries: list[tuple[Entry, bytes]]) -> None:
        """Commit all copies of one message, or none (then raise OSError: the caller answers 4xx)."""
        done: list[Entry] = []
        self._pending.update(e.id for e, _ in entries)
        try:
            for e, data in entries:
                done.append(e)  # before the write: a failed one may have left its .eml behind
                await asyncio.to_thread(self.spool.put, e, data)
        except OSError:
            for e in done:  # no half-accepted message: the client retries the whole of it
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(self.spool.remove, e)
            raise
        finally:
            self._pending.difference_update(e.id for e, _ in entries)
        for e, _ in entries:
            self._schedule(e)

    async def rescan(self) -> int:
        """Bring the schedule in line with the spool on disk; how many entries it changed.
        Schedules committed entries memory does not know (nothing held only in memory can strand
        a message), honours an operator's ``queue retry`` (an earlier next attempt) and forgets
        entries an operator deleted or held. Entries being attempted or written are left alone."""
        before = set(self._entries)  # taken first: an entry committed later is not "gone"
        changed, present = await asyncio.to_thread(self.spool.scan)
        busy = self._pending | self._inflight | self._finished
        n = 0
        for e in changed:
            if e.id in busy:
                continue
            cur = self._entries.get(e.id)
            if cur is None:
                log.warning("queue %s: found by the spool rescan, scheduling it", e.id)
                self._schedule(e)
                n += 1
            elif e.next_attempt < cur.next_attempt:
                log.info("queue %s: retry requested, attempting now", e.id)
                cur.next_attempt = e.next_attempt
                self._schedule(cur)
                n += 1
        for eid in before - present - busy:
            if eid in self._entries:
                log.info("queue %s: no longer in the spool (deleted or held by an operator)", eid)
                del self._entries[eid]
                n += 1
        return n

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(self._rescan_every)
            try:
                await self.rescan()
            except Exception:  # a failing rescan must not stop the next one
                log.exception("queue: spool rescan failed")

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
                if e is None or e.next_attempt > t or eid in self._inflight:
                    continue  # rescheduled, gone or being attempted; a newer heap item stands for it
                self._inflight.add(eid)
                task = asyncio.create_task(self._guarded(e))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            timeout = max(0.0, self._heap[0][0] - now()) if self._heap else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _guarded(self, e: Entry) -> None:
        """One attempt, whatever goes wrong inside it: an unexpected exception reschedules the
        entry with backoff (it stays on disk), and repeated ones hold it for an operator."""
        try:
            await self._attempt(e)
            self._faults.pop(e.id, None)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            n = self._faults[e.id] = self._faults.get(e.id, 0) + 1
            reason = f"{type(err).__name__}: {err}"
            if n >= MAX_FAULTS:
                log.error("queue %s: %d unexpected failures in a row, holding it: %s", e.id, n, reason)
                self._entries.pop(e.id, None)
                self._faults.pop(e.id, None)
                try:
                    await asyncio.to_thread(self.spool.hold, e, f"{n} unexpected failures, last: {reason}")
                except OSError as herr:  # still on disk in the spool: the rescan retries it later
                    log.error("queue %s: could not be held either (%s); left in the spool", e.id, herr)
            else:
                cfg = self._cfg()
                e.next_attempt = now() + backoff(e.attempts or 1, cfg.delivery.retry_min, cfg.delivery.retry_max)
                log.error("queue %s: unexpected failure (%s); retrying in %.0f s", e.id, reason,
                          e.next_attempt - now())
                self._schedule(e)
        finally:
            self._inflight.discard(e.id)

    def oldest_age(self) -> float:
        """Seconds the oldest waiting copy has been in the spool (0 when none waits)."""
        return max(0.0, now() - min(e.created for e in self._entries.values())) if self._entries else 0.0

    def held(self) -> int:
        return len(list(self.spool.held.glob("*.json"))) if self.spool.held.exists() else 0

    async def _attempt(self, e: Entry) -> None:
        async with self._sem:
            cfg = self._cfg()
            tenant = cfg.tenant_by_name(e.tenant)
            e.attempts += 1
            try:
                data = await asyncio.to_thread(self.spool.data, e)
            except FileNotFoundError:  # held or deleted by an operator since it was scheduled
                log.info("queue %s: no longer in the spool (deleted or held by an operator)", e.id)
                self._entries.pop(e.id, None)
                return
            try:
                if tenant is None:  # a reload removed it: keep the mail until it expires
                    raise TransientError(replies.LOCAL_ERROR, f"tenant {e.tenant} unknown")
                outcome = await self._delivery().deliver(tenant, e.mail_from, e.rcpts, data, smtputf8=e.smtputf8)
            except PermanentError as err:
                log.warning("queue %s: refused for good: %s", e.id, err.detail)
                await self._bounce(e, {r: dsn.Refusal(err.reply.code, f"{err.reply.enhanced} {err.reply.text}",
                                                      "tenant endpoint") for r in e.rcpts}, delivered=())
                await self._done(e)
                return
            except TransientError as err:
                e.last_error = err.detail
                if now() - e.created >= cfg.delivery.lifetime:
                    log.error("queue %s: giving up after %d attempts: %s", e.id, e.attempts, err.detail)
                    await self._bounce(e, {r: dsn.Refusal(451, f"4.4.7 Delivery time expired: {err.reply.text}",
                                                          "tenant endpoint") for r in e.rcpts}, delivered=())
                    await self._done(e)
                    return
                e.next_attempt = now() + backoff(e.attempts, cfg.delivery.retry_min, cfg.delivery.retry_max)
                if not await asyncio.to_thread(self.spool.update, e):
                    log.info("queue %s: removed from the spool by an operator during the attempt", e.id)
                    self._entries.pop(e.id, None)
                    return
                log.info("queue %s: attempt %d deferred (%s); next in %.0f s", e.id, e.attempts, err.detail,
                         e.next_attempt - now())
                self._schedule(e)
                return
            log.info("queue %s: delivered to %s after %d attempt(s): %s", e.id, outcome.endpoint, e.attempts,
                     outcome.reply[:120])
            if outcome.refused:
                await self._bounce(e, dict(outcome.refused), delivered=outcome.accepted)
            await self._done(e)

    async def _done(self, e: Entry) -> None:
        """Forget a finished entry. Never raises: the tenant already has the message, and a retry
        would duplicate it. If the files cannot be removed, this process will not touch the entry
        again; a restart re-delivers it (a duplicate, never a loss) and the log says so."""
        self._entries.pop(e.id, None)
        try:
            await asyncio.to_thread(self.spool.remove, e)
        except OSError as err:
            self._finished.add(e.id)
            log.error("queue %s: delivered, but its spool files could not be removed (%s); a restart "
                      "would deliver it again", e.id, err)

    async def _bounce(self, e: Entry, refused: dict[str, dsn.Refusal], delivered: Sequence[str]) -> None:
        """Queue a DSN to the sender. Never raises (it runs after the tenant's verdict, which
        stands whatever happens here); a DSN that cannot be queued is logged with the recipients."""
        try:
            await self._queue_dsn(e, refused, delivered)
        except Exception as err:
            log.error("queue %s: DSN could not be queued (%s: %s); failed recipients: %s", e.id,
                      type(err).__name__, err, ", ".join(refused))

    async def _queue_dsn(self, e: Entry, refused: dict[str, dsn.Refusal], delivered: Sequence[str]) -> None:
        """Never for a null-sender message (a bounce of a bounce)."""
        if not e.mail_from:
            log.warning("queue %s: not bouncing a null-sender message; %d recipient(s) failed", e.id, len(refused))
            return
        cfg = self._cfg()
        original = await asyncio.to_thread(self.spool.data, e)
        body = dsn.build(original=original, mail_from=e.mail_from, refused=refused, reporting_mta=cfg.hostname,
                         queue_id=e.id, arrival=dt.datetime.fromtimestamp(e.created, dt.UTC),
                         processed_header=cfg.processed_header, delivered=delivered)
        t = now()
        # RFC 6531 §3.4: a non-ASCII sender can only be reached with SMTPUTF8.
        bounce = Entry(id=f"{e.id}-dsn", tenant=e.tenant, mail_from="", rcpts=[e.mail_from],
                       smtputf8=not e.mail_from.isascii(), created=t, next_attempt=t)
        await self.enqueue([(bounce, body)])
