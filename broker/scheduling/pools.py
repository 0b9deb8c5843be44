"""The daemon's pools and their link to the ledger: start, size, run, replace lost actors.

A pool starts when some node of the cluster can hold one of its actors (the GPU pool needs a
node with GPUs; the memory pool a node marked with the memory-node resource), with its minimum
of actors. It grows by one actor at a time while tasks wait for it and the ledger shows a node
with room, up to its maximum, and retires actors idle for `pool_idle_s` down to its minimum.
"""

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from broker.scheduling.ledger import Ledger
from broker.scheduling.scheduler import Scheduler
from workers.cluster import read_nodes
from workers.errors import WorkerError
from workers.outcome import RunOutcome
from workers.pool import ActorInfo, PoolSpec, RayActorPool

log = structlog.get_logger("swarm.pools")

SIZING_PERIOD_S = 1.0


class PoolSet:
    def __init__(
        self,
        specs: list[PoolSpec],
        handler_modules: list[str],
        scheduler: Scheduler,
        idle_s: float = 60.0,
        actor_env: dict[str, str] | None = None,
    ) -> None:
        self._specs = {spec.name: spec for spec in specs}
        self._handler_modules = list(handler_modules)
        self._actor_env = dict(actor_env or {})
        self._pools: dict[str, RayActorPool] = {}
        self._running: dict[str, PoolSpec] = {}
        self._scheduler = scheduler
        self._ledger: Ledger = scheduler.ledger
        self._idle_s = idle_s
        self._growing: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._sizing_needed = asyncio.Event()
        self._sizer: asyncio.Task[None] | None = None
        scheduler.on_pool_waiting = lambda pool: self._sizing_needed.set()

    @property
    def names(self) -> set[str]:
        return set(self._pools)

    @property
    def running(self) -> dict[str, PoolSpec]:
        """The pools started, by name. Read for every task's placement, so it is built once,
        when the pools start (the set of pools never changes afterwards)."""
        return self._running

    def actors(self, name: str) -> list[ActorInfo]:
        return self._pools[name].actors

    def spec(self, name: str) -> PoolSpec:
        return self._pools[name].spec

    async def start(self) -> None:
        await self.refresh_nodes()
        for spec in self._specs.values():
            if not self._ledger.could_host(spec.shape, spec.custom_resources):
                log.info(
                    "pool_not_started",
                    reason="no_node_can_hold_actor",
                    pool=spec.name,
                    shape=spec.shape.as_dict(),
                    needs=spec.custom_resources,
                )
                continue
            pool = RayActorPool(spec, self._handler_modules, self._actor_env)
            self._pools[spec.name] = pool
            self._running[spec.name] = spec
            for info in await pool.start():
                self._ledger.add_actor(info)
            log.info(
                "pool_started",
                pool=spec.name,
                actors=spec.min_size,
                max_actors=spec.max_size,
                shape=spec.shape.as_dict(),
            )
        if "cpu" not in self._pools:
            raise WorkerError(
                "no node of the cluster can hold a CPU actor; lower "
                "SWARM_CPU_ACTOR_CPUS or add nodes"
            )
        self._sizer = asyncio.create_task(self._size_pools())

    async def refresh_nodes(self) -> None:
        """Read the cluster's nodes into the ledger; replace actors on nodes that are gone."""
        nodes = await asyncio.to_thread(read_nodes)
        gone = set(self._ledger.set_nodes(nodes))
        for load in list(self._ledger.actors.values()):
            if load.info.node_id in gone:
                self.actor_lost(load.info)
        for name in self._pools:
            self._scheduler.wake(name)  # a node that joined may be where waiters fit

    async def run(
        self,
        actor: ActorInfo,
        handler: str,
        task_type: str,
        args: object,
        timeout_s: float | None,
        *,
        task_id: str = "",
        attempt: int = 1,
        coalesce: bool = False,
    ) -> RunOutcome:
        return await self._pools[actor.pool].run(
            actor.key,
            handler,
            task_type,
            args,
            timeout_s,
            task_id=task_id,
            attempt=attempt,
            coalesce=coalesce,
        )

    async def run_streaming(
        self,
        actor: ActorInfo,
        handler: str,
        task_type: str,
        args: object,
        timeout_s: float | None,
        task_id: str,
        attempt: int,
        on_progress: Callable[[bytes, int], None],
    ) -> RunOutcome:
        return await self._pools[actor.pool].run_streaming(
            actor.key, handler, task_type, args, timeout_s, task_id, attempt, on_progress
        )

    def actor_lost(self, actor: ActorInfo) -> None:
        """Drop a dead actor from its pool and the ledger; the sizing loop replaces it."""
        pool = self._pools[actor.pool]
        if pool.remove(actor.key) is None:
            return  # another task on the same actor already reported it
        self._ledger.remove_actor(actor.key)
        log.warning("actor_lost", actor=actor.key, node=actor.node_id)
        self._sizing_needed.set()

    def retire(self, actor: ActorInfo) -> None:
        """Take no new tasks on `actor` and stop it once its running tasks end: its process
        holds a sync handler's thread that a time limit or a cancel could not interrupt."""
        self._ledger.drain(actor.key)
        log.info("actor_retiring", reason="sync_handler_not_stoppable", actor=actor.key)
        self.reap()

    def reap(self) -> None:
        """Stop retired actors that have finished their last task."""
        for key in self._ledger.drained():
            info = self._ledger.actors[key].info
            self._ledger.remove_actor(key)
            self._pools[info.pool].remove(key)
            self._sizing_needed.set()

    # -- sizing ------------------------------------------------------------------------------
    async def _size_pools(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._sizing_needed.wait(), SIZING_PERIOD_S)
            self._sizing_needed.clear()
            for name, pool in self._pools.items():
                self._size(name, pool)

    def _size(self, name: str, pool: RayActorPool) -> None:
        spec = pool.spec
        if self._growing.get(name, 0):
            return  # one actor at a time: the next decision sees the ledger with it
        count = len(pool.actors)
        wanted = count < spec.min_size or (
            self._scheduler.waiting(name) > 0 and count < spec.max_size
        )
        if wanted and self._ledger.room_for_actor(spec.shape, spec.custom_resources):
            self._grow(name, pool)
            return
        if count > spec.min_size and self._scheduler.waiting(name) == 0:
            for key in self._ledger.idle_actors(name, self._idle_s)[: count - spec.min_size]:
                self._ledger.remove_actor(key)
                pool.remove(key)
                log.info("idle_actor_retired", pool=name, actor=key)

    def _grow(self, name: str, pool: RayActorPool) -> None:
        self._growing[name] = self._growing.get(name, 0) + 1

        async def grow() -> None:
            try:
                info = await pool.add_actor()
            except WorkerError as exc:
                log.error("actor_add_failed", pool=name, error=str(exc))
                log.debug("actor_add_failed_traceback", exc_info=True)
                return
            finally:
                self._growing[name] -= 1
            self._ledger.add_actor(info)
            if info.node_id not in self._ledger.nodes:
                await self.refresh_nodes()  # Ray placed it on a node that joined since
            log.info(
                "pool_grew", pool=name, actor=info.key, node=info.node_id, actors=len(pool.actors)
            )
            self._scheduler.wake(name)
            self._sizing_needed.set()

        task = asyncio.create_task(grow())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def stop(self) -> None:
        if self._sizer is not None:
            self._sizer.cancel()
        for task in self._background:
            task.cancel()
        for pool in self._pools.values():
            for info in pool.actors:
                self._ledger.remove_actor(info.key)
            pool.stop()
