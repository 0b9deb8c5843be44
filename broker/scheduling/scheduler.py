"""The scheduler: an actor with room for each task, waiting by priority when there is none.

Plain asyncio and the ledger; no Ray, no AMQP. Waiting tasks form one list per pool,
served highest `priority` first and then first come; when room frees up, waiters are tried
in that order and any that fits is placed (a large waiter does not block a small one
behind it).

Two listeners watch the waiting: the pools (a pool with waiters may grow) and the ingress (a
queue with too many waiters stops being consumed, so its backlog stays in RabbitMQ).
"""

import asyncio
import bisect
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter

from broker.errors import DeadlinePassed
from broker.scheduling.ledger import Ledger
from workers.pool import ActorInfo
from workers.resources import ResourceVector


@dataclass(eq=False)
class _Waiter:
    order: tuple[int, int]  # (-priority, arrival): sorting by it gives the service order
    request: ResourceVector = field(compare=False)
    placed: "asyncio.Future[ActorInfo]" = field(compare=False)
    tag: str | None = field(compare=False, default=None)


_SERVICE_ORDER = attrgetter("order")


class Scheduler:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        # Per pool, in service order (kept sorted as waiters arrive, not sorted per wake).
        self._waiting: dict[str, list[_Waiter]] = {}
        # Per pool, how many waiters ask each distinct request: with one distinct request (the
        # usual case: one task type per pool), a wake stops at the first that does not fit.
        self._requests: dict[str, Counter[ResourceVector]] = {}
        self._waiting_by_tag: dict[str, int] = {}
        self._arrival = itertools.count()
        self.on_pool_waiting: Callable[[str], None] = lambda pool: None
        self.on_tag_waiting: Callable[[str, int], None] = lambda tag, count: None

    def waiting_by_tag(self, tag: str) -> int:
        return self._waiting_by_tag.get(tag, 0)

    def _count(self, tag: str | None, delta: int) -> None:
        if tag is None:
            return
        count = self._waiting_by_tag.get(tag, 0) + delta
        self._waiting_by_tag[tag] = count
        self.on_tag_waiting(tag, count)

    def waiting(self, pool: str) -> int:
        return len(self._waiting.get(pool, ()))

    def waiting_requests(self, pool: str) -> Counter[ResourceVector]:
        """How many waiters of `pool` ask each distinct request (a copy)."""
        return Counter(self._requests.get(pool, ()))

    def reject_waiting(self, pool: str, error: Exception) -> int:
        """End every wait of `pool` with `error`; returns how many ended."""
        queue = self._waiting.get(pool)
        if not queue:
            return 0
        ended = 0
        for waiter in queue:
            self._gone(pool, waiter)
            if not waiter.placed.done():
                waiter.placed.set_exception(error)
                ended += 1
        queue.clear()
        return ended

    async def acquire(
        self,
        pool: str,
        request: ResourceVector,
        priority: int,
        tag: str | None = None,
        *,
        deadline_s: float | None = None,
    ) -> ActorInfo:
        """An actor of `pool` with room for `request`; waits until there is one. `tag` names
        where the task came from (its queue), for the waiting-per-tag count. A wait still
        going at `deadline_s` (unix seconds, the task's `deadline`) ends then, with
        DeadlinePassed: the task is answered `expired` when its deadline passes, not when
        room frees up, and leaves the waiting list at once."""
        queue = self._waiting.setdefault(pool, [])
        if not queue:
            placed = self.ledger.place(pool, request)
            if placed is not None:
                return placed
        loop = asyncio.get_running_loop()
        waiter = _Waiter((-priority, next(self._arrival)), request, loop.create_future(), tag)
        if queue and waiter.order < queue[-1].order:
            bisect.insort(queue, waiter, key=_SERVICE_ORDER)  # a higher priority
        else:
            queue.append(waiter)
        self._requests.setdefault(pool, Counter())[request] += 1
        self._count(tag, +1)
        # Backfill: the newcomer may fit now even though the waiters ahead of it do not.
        self.wake(pool)
        self.on_pool_waiting(pool)
        timer = None
        if deadline_s is not None and not waiter.placed.done():
            # Wall clock to loop clock once; a timer, not a task: most waits end before it.
            timer = loop.call_later(
                max(0.0, deadline_s - time.time()), self._expire, pool, waiter, deadline_s
            )
        try:
            return await waiter.placed
        except asyncio.CancelledError:
            placed_future = waiter.placed
            if (
                placed_future.done()
                and not placed_future.cancelled()
                and placed_future.exception() is None
            ):
                # Placed in the same tick it was cancelled: give the room back.
                self.release(pool, placed_future.result(), request)
            else:
                self._forget(pool, waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            self._count(tag, -1)

    def _expire(self, pool: str, waiter: _Waiter, deadline_s: float) -> None:
        if not waiter.placed.done():
            self._forget(pool, waiter)
            waiter.placed.set_exception(DeadlinePassed(deadline_s))

    def release(self, pool: str, actor: ActorInfo, request: ResourceVector) -> None:
        self.ledger.finish(actor.key, request)
        self.wake(pool)

    def wake(self, pool: str) -> None:
        """Place as many waiters of `pool` as now fit, in priority order."""
        queue = self._waiting.get(pool)
        if not queue:
            return
        requests = self._requests[pool]
        # One distinct request: once one does not fit, none behind it does.
        uniform = len(requests) == 1
        kept: list[_Waiter] = []
        # Requests that found no room: a waiter asking at least as much cannot fit either,
        # so it is kept without searching the actors again.
        unplaceable: list[ResourceVector] = []
        for index, waiter in enumerate(queue):
            if waiter.placed.done():  # cancelled: its acquire finds it gone
                self._gone(pool, waiter)
                continue
            if unplaceable and any(failed.fits_in(waiter.request) for failed in unplaceable):
                kept.append(waiter)
                continue
            placed = self.ledger.place(pool, waiter.request)
            if placed is None:
                if uniform:
                    for behind in queue[index:]:
                        if behind.placed.done():
                            self._gone(pool, behind)
                        else:
                            kept.append(behind)
                    break
                kept.append(waiter)
                unplaceable.append(waiter.request)
            else:
                self._gone(pool, waiter)
                waiter.placed.set_result(placed)
        queue[:] = kept

    def _gone(self, pool: str, waiter: _Waiter) -> None:
        requests = self._requests[pool]
        requests[waiter.request] -= 1
        if requests[waiter.request] <= 0:
            del requests[waiter.request]

    def _forget(self, pool: str, waiter: _Waiter) -> None:
        queue = self._waiting.get(pool, [])
        if waiter in queue:
            queue.remove(waiter)
            self._gone(pool, waiter)
