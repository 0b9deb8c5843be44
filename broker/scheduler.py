"""The scheduler: picks a pool for each task, then an actor with room, waiting by priority.

Plain asyncio and the ledger; no Ray, no AMQP. Waiting tasks form one heap per pool, highest
`priority` first and then first come; when room frees up, waiters are tried in that order and
any that fits is placed (a large waiter does not block a small one behind it).
"""

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field

from broker.errors import Rejection
from broker.ledger import Ledger
from workers.pool import ActorInfo
from workers.resources import ResourceVector


@dataclass(order=True)
class _Waiter:
    sort_key: tuple[int, int]
    request: ResourceVector = field(compare=False)
    placed: "asyncio.Future[ActorInfo]" = field(compare=False)


class Scheduler:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._waiting: dict[str, list[_Waiter]] = {}
        self._arrival = itertools.count()

    def choose_pool(
        self, pinned: str | None, request: ResourceVector, pools: set[str]
    ) -> str | Rejection:
        """The message's `pool` when given; else `gpu` for GPU requests; else `cpu`."""
        if pinned is not None:
            wanted = pinned
        elif request.gpus > 0:
            wanted = "gpu"
        else:
            wanted = "cpu"
        if wanted not in pools:
            return Rejection(
                "unsatisfiable",
                f"the {wanted!r} pool is not running on this daemon "
                f"(running: {', '.join(sorted(pools)) or 'none'})",
            )
        return wanted

    def check_fits(self, pool: str, request: ResourceVector) -> Rejection | None:
        if not self.ledger.could_ever_fit(request):
            return Rejection(
                "unsatisfiable",
                f"no node of the cluster can ever hold {request.as_dict()}; "
                f"the largest node has {self.ledger.largest_node().as_dict()}",
            )
        if not any(request.fits_in(shape) for shape in self.ledger.pool_shapes(pool)):
            shapes = {str(shape.as_dict()) for shape in self.ledger.pool_shapes(pool)}
            return Rejection(
                "unsatisfiable",
                f"no actor of the {pool!r} pool is large enough for {request.as_dict()} "
                f"(actor shapes: {', '.join(sorted(shapes)) or 'none'})",
            )
        return None

    def waiting(self, pool: str) -> int:
        return len(self._waiting.get(pool, ()))

    async def acquire(self, pool: str, request: ResourceVector, priority: int) -> ActorInfo:
        """An actor of `pool` with room for `request`; waits until there is one."""
        queue = self._waiting.setdefault(pool, [])
        if not queue:
            placed = self.ledger.place(pool, request)
            if placed is not None:
                return placed
        waiter = _Waiter(
            (-priority, next(self._arrival)),
            request,
            asyncio.get_running_loop().create_future(),
        )
        heapq.heappush(queue, waiter)
        try:
            return await waiter.placed
        except asyncio.CancelledError:
            if waiter.placed.done() and not waiter.placed.cancelled():
                # Placed in the same tick it was cancelled: give the room back.
                self.release(pool, waiter.placed.result(), request)
            else:
                self._forget(pool, waiter)
            raise

    def release(self, pool: str, actor: ActorInfo, request: ResourceVector) -> None:
        self.ledger.finish(actor.key, request)
        self.wake(pool)

    def wake(self, pool: str) -> None:
        """Place as many waiters of `pool` as now fit, in priority order."""
        queue = self._waiting.get(pool)
        if not queue:
            return
        kept: list[_Waiter] = []
        while queue:
            waiter = heapq.heappop(queue)
            if waiter.placed.done():
                continue
            placed = self.ledger.place(pool, waiter.request)
            if placed is None:
                kept.append(waiter)
            else:
                waiter.placed.set_result(placed)
        for waiter in kept:
            heapq.heappush(queue, waiter)

    def _forget(self, pool: str, waiter: _Waiter) -> None:
        queue = self._waiting.get(pool, [])
        if waiter in queue:
            queue.remove(waiter)
            heapq.heapify(queue)
