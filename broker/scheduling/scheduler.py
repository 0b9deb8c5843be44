"""The scheduler: an actor with room for each task, waiting by priority when there is none.

Plain asyncio and the ledger; no Ray, no AMQP. Waiting tasks of a pool are served highest
`priority` first and then first come; when room frees up, waiters are tried in that order and
any that fits is placed (a large waiter does not block a small one behind it). They are kept
in one list per pool and distinct request, so a wake tries the waiters it places and at most
one more per request, however many wait.

Two listeners watch the waiting: the pools (a pool with waiters may grow) and the ingress (a
queue with too many waiters stops being consumed, so its backlog stays in RabbitMQ).
"""

import asyncio
import bisect
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from broker.errors import DeadlinePassed
from broker.scheduling.ledger import Ledger
from workers.pool import ActorInfo
from workers.resources import ResourceVector


@dataclass(eq=False, slots=True)
class _Waiter:
    order: tuple[int, int]  # (-priority, arrival): sorting by it gives the service order
    request: ResourceVector = field(compare=False)
    placed: "asyncio.Future[ActorInfo]" = field(compare=False)
    tag: str | None = field(compare=False, default=None)
    origin: Any = field(compare=False, default=None)  # the caller's, for `waiting_origins`


_SERVICE_ORDER = attrgetter("order")


def _head_order(entry: list[Any]) -> tuple[int, int]:
    """In a wake: the service order of the next waiter of one request."""
    order: tuple[int, int] = entry[1][entry[2]].order
    return order


class Scheduler:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        # Per pool and distinct request (usually one or two per pool: one per task type), the
        # waiters in service order (kept sorted as waiters arrive, not sorted per wake). A list
        # is never empty: it goes with its last waiter.
        self._waiting: dict[str, dict[ResourceVector, list[_Waiter]]] = {}
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
        return sum(map(len, self._waiting.get(pool, {}).values()))

    def waiting_origins(self) -> Iterator[tuple[str | None, Any]]:
        """(tag, origin) of every waiter still waiting, in no order: read-only, for the
        oldest-waiting metric (broker/ops/waiting_age.py). Consume it without awaiting."""
        for queues in self._waiting.values():
            for queue in queues.values():
                for waiter in queue:
                    if waiter.origin is not None and not waiter.placed.done():
                        yield waiter.tag, waiter.origin

    def waiting_requests(self, pool: str) -> Counter[ResourceVector]:
        """How many waiters of `pool` ask each distinct request (a copy)."""
        return Counter({request: len(q) for request, q in self._waiting.get(pool, {}).items()})

    def reject_waiting(self, pool: str, error: Exception) -> int:
        """End every wait of `pool` with `error`; returns how many ended."""
        queues = self._waiting.get(pool)
        if not queues:
            return 0
        waiters = sorted((w for q in queues.values() for w in q), key=_SERVICE_ORDER)
        queues.clear()
        ended = 0
        for waiter in waiters:
            if not waiter.placed.done():
                waiter.placed.set_exception(error)
                ended += 1
        return ended

    async def acquire(
        self,
        pool: str,
        request: ResourceVector,
        priority: int,
        tag: str | None = None,
        *,
        deadline_s: float | None = None,
        origin: Any = None,
    ) -> ActorInfo:
        """An actor of `pool` with room for `request`; waits until there is one. `tag` names
        where the task came from (its queue), for the waiting-per-tag count. A wait still
        going at `deadline_s` (unix seconds, the task's `deadline`) ends then, with
        DeadlinePassed: the task is answered `expired` when its deadline passes, not when
        room frees up, and leaves the waiting list at once. `origin` is kept with a waiter,
        only to be read back by `waiting_origins`."""
        queues = self._waiting.setdefault(pool, {})
        if not queues:
            placed = self.ledger.place(pool, request)
            if placed is not None:
                return placed
        loop = asyncio.get_running_loop()
        waiter = _Waiter(
            (-priority, next(self._arrival)), request, loop.create_future(), tag, origin
        )
        queue = queues.get(request)
        if queue is None:
            queues[request] = [waiter]
        elif waiter.order < queue[-1].order:
            bisect.insort(queue, waiter, key=_SERVICE_ORDER)  # a higher priority
        else:
            queue.append(waiter)
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
        queues = self._waiting.get(pool)
        if not queues:
            return
        # Per distinct request: [request, its waiters, how many of them were placed (or had
        # been cancelled: their acquire finds them gone)]. Lists, not dicts keyed by the
        # request: a vector's hash is Python code, and this runs for every finished task.
        entries: list[list[Any]] = [[request, queue, 0] for request, queue in queues.items()]
        tried = entries.copy()  # the requests still worth trying
        while tried:
            # The first waiter in service order among the requests still tried.
            entry = tried[0] if len(tried) == 1 else min(tried, key=_head_order)
            request, queue, index = entry
            waiter = queue[index]
            if not waiter.placed.done():
                placed = self.ledger.place(pool, request)
                if placed is None:
                    # No room for it: none for any request asking at least as much either,
                    # so their waiters are left as they are.
                    tried = [other for other in tried if not request.fits_in(other[0])]
                    continue
                waiter.placed.set_result(placed)
            entry[2] = index = index + 1
            if index == len(queue):
                tried.remove(entry)
        for request, queue, count in entries:
            if count:
                del queue[:count]
                if not queue:
                    del queues[request]

    def _forget(self, pool: str, waiter: _Waiter) -> None:
        queues = self._waiting.get(pool, {})
        queue = queues.get(waiter.request)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del queues[waiter.request]
