"""The daemon's pools and their link to the ledger: start, run, replace lost actors, track nodes."""

import asyncio

import structlog

from broker.ledger import Ledger
from broker.scheduler import Scheduler
from workers.cluster import read_nodes
from workers.errors import WorkerError
from workers.outcome import RunOutcome
from workers.pool import ActorInfo, PoolSpec, RayActorPool

log = structlog.get_logger("swarm.pools")


class PoolSet:
    def __init__(
        self, specs: list[PoolSpec], handler_modules: list[str], scheduler: Scheduler
    ) -> None:
        self._pools = {spec.name: RayActorPool(spec, handler_modules) for spec in specs}
        self._scheduler = scheduler
        self._ledger: Ledger = scheduler.ledger
        self._replacing: set[asyncio.Task[None]] = set()

    @property
    def names(self) -> set[str]:
        return set(self._pools)

    def actors(self, name: str) -> list[ActorInfo]:
        return self._pools[name].actors

    def spec(self, name: str) -> PoolSpec:
        return self._pools[name].spec

    async def start(self) -> None:
        await self.refresh_nodes()
        for pool in self._pools.values():
            for info in await pool.start():
                self._ledger.add_actor(info)
            log.info("pool started", pool=pool.spec.name, actors=pool.spec.size)

    async def refresh_nodes(self) -> None:
        """Read the cluster's nodes into the ledger; replace actors on nodes that are gone."""
        nodes = await asyncio.to_thread(read_nodes)
        gone = set(self._ledger.set_nodes(nodes))
        for load in list(self._ledger.actors.values()):
            if load.info.node_id in gone:
                self.actor_lost(load.info)

    async def run(
        self, actor: ActorInfo, handler: str, task_type: str, args: object, timeout_s: float | None
    ) -> RunOutcome:
        return await self._pools[actor.pool].run(actor.key, handler, task_type, args, timeout_s)

    def actor_lost(self, actor: ActorInfo) -> None:
        """Drop a dead actor from its pool and the ledger, and start a replacement."""
        pool = self._pools[actor.pool]
        if pool.remove(actor.key) is None:
            return  # another task on the same actor already reported it
        self._ledger.remove_actor(actor.key)
        log.warning("actor lost; replacing it", actor=actor.key, node=actor.node_id)
        task = asyncio.create_task(self._replace(pool))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace(self, pool: RayActorPool) -> None:
        try:
            info = await pool.add_actor()
        except WorkerError as exc:
            log.error("could not replace a lost actor", pool=pool.spec.name, error=str(exc))
            return
        self._ledger.add_actor(info)
        self._scheduler.wake(pool.spec.name)

    def stop(self) -> None:
        for task in self._replacing:
            task.cancel()
        for pool in self._pools.values():
            for info in pool.actors:
                self._ledger.remove_actor(info.key)
            pool.stop()
