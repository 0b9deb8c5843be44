"""The daemon's pools and their link to the ledger: start, size, run, replace lost actors.

A pool starts when some node of the cluster can hold one of its actors (the GPU pool needs a
node with GPUs; the memory pool a node marked with the memory-node resource), with its minimum
of actors. It grows by one actor at a time while tasks wait for it and the ledger shows a node
with room, up to its maximum, and retires actors idle for `pool_idle_s` down to its minimum.

On a cluster with an autoscaler, a pool also starts when one of the autoscaler's node types
could hold its actor, with no actor if no node present can; while it wants actors that no
node has room for, the autoscaler is asked for them (broker/scheduling/elastic.py).
"""

import asyncio
import contextlib
import itertools
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import structlog

from broker.errors import ScaleUpTimedOut
from broker.scheduling.elastic import (
    ElasticCapacity,
    ScaleUps,
    actors_wanted,
    memory_in_bundle,
    retirement_order,
    unmanaged_nodes,
)
from broker.scheduling.ledger import Ledger
from broker.scheduling.scheduler import Scheduler
from workers import autoscaling
from workers.cluster import read_nodes
from workers.errors import WorkerError
from workers.outcome import RunOutcome
from workers.pool import ActorInfo, PoolSpec, RayActorPool

log = structlog.get_logger("swarm.pools")

SIZING_PERIOD_S = 1.0
# How long stop() waits for a scale-up request in flight before it withdraws anyway.
REQUEST_IN_FLIGHT_WAIT_S = 10.0


class PoolSet:
    def __init__(
        self,
        specs: list[PoolSpec],
        handler_modules: list[str],
        scheduler: Scheduler,
        idle_s: float = 60.0,
        actor_env: dict[str, str] | None = None,
        *,
        scale_up_timeout_s: float = 600.0,
        autoscaler_config: Path | None = None,
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
        scheduler.on_pool_waiting = self._pool_waiting
        self._autoscaler_config = autoscaler_config
        # Node tables by the order their reads began: a slow read that ends after a later one
        # has been applied is stale, and dropped.
        self._node_reads = itertools.count(1)
        self._node_read_applied = 0
        # Set at start: whether an autoscaler can add nodes, and what they could hold.
        self.elastic = False
        self.capacity = ElasticCapacity(self._ledger)
        self._scale_ups = ScaleUps(scale_up_timeout_s)
        # Per pool, what one actor asks of the autoscaler.
        self._bundles: dict[str, dict[str, float]] = {}
        # Whether nodes the autoscaler did not launch can be told apart (see _unmanaged_nodes).
        self._types_from_config = False
        self._nodes_at_start: frozenset[str] = frozenset()
        # The request standing in Ray; None: unknown (one a previous daemon left may stand).
        self._requested: list[dict[str, float]] | None = None
        # Held while a request is sent (in a thread): stop()'s withdrawal comes after it.
        self._request_lock = threading.Lock()
        self._stopped = False
        # Whether tasks reached this daemon: a standby, which gets none, must not replace the
        # active daemon's request (Ray keeps one per cluster) with its own empty one.
        self._taken_work = False

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

    def scale_up(self, name: str) -> int:
        """Actors of pool `name` the autoscaler is asked for (0: none pending)."""
        return self._scale_ups.actors(name)

    async def start(self) -> None:
        await self.start_pools()
        self._sizer = asyncio.create_task(self._size_pools())

    async def start_pools(self) -> None:
        """Start the pools without the sizing loop (start() runs it; tests size by hand)."""
        await self.refresh_nodes()
        self._nodes_at_start = frozenset(node.node_id for node in self._ledger.alive_nodes())
        await self._discover_elasticity()
        for spec in self._specs.values():
            now = self._ledger.could_host(spec.shape, spec.custom_resources)
            if not now and not (self.elastic and self.capacity.could_host(spec)):
                # At debug: a machine without GPUs or memory nodes says so at every start,
                # and daemon_ready names the pools that did start.
                log.debug(
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
            if now:
                for info in await pool.start():
                    self._ledger.add_actor(info)
            log.info(
                "pool_started",
                pool=spec.name,
                actors=len(pool.actors),
                min_actors=spec.min_size,
                max_actors=spec.max_size,
                shape=spec.shape.as_dict(),
                scales_from_zero=not now,
            )
        if "cpu" not in self._pools:
            raise WorkerError(
                "no node of the cluster can hold a CPU actor; lower "
                "SWARM_CPU_ACTOR_CPUS or add nodes"
            )

    async def _discover_elasticity(self) -> None:
        """Whether an autoscaler can add nodes: the node types it can add, where known."""
        path = self._autoscaler_config
        node_types = await asyncio.to_thread(autoscaling.node_types_from_ray)
        if node_types is None and path is not None:
            node_types = await asyncio.to_thread(autoscaling.read_config_file, path)
            self._types_from_config = node_types is not None
        self.elastic = node_types is not None
        if node_types is None:
            return
        types = node_types
        self.capacity = ElasticCapacity(self._ledger, types)
        self._bundles = {
            spec.name: autoscaling.bundle(
                spec.shape, spec.custom_resources, memory=memory_in_bundle(spec, types)
            )
            for spec in self._specs.values()
        }
        log.info(
            "cluster_elastic",
            node_types={t.name: {**t.total.as_dict(), **t.custom} for t in types},
        )

    async def refresh_nodes(self) -> None:
        """Read the cluster's nodes into the ledger; replace actors on nodes that are gone."""
        read = next(self._node_reads)
        nodes = await asyncio.to_thread(read_nodes)
        if read < self._node_read_applied:
            return  # a refresh begun after this one has applied a newer table
        self._node_read_applied = read
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
        self._taken_work = True
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
        self._taken_work = True
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
    def _pool_waiting(self, pool: str) -> None:
        self._taken_work = True
        self._sizing_needed.set()

    async def _size_pools(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._sizing_needed.wait(), SIZING_PERIOD_S)
            self._sizing_needed.clear()
            await self.size_once()

    async def size_once(self) -> None:
        """One sizing pass: grow, retire, and ask the autoscaler for what is pending."""
        if self._scale_ups.any:
            # Nodes the autoscaler adds are seen within a sizing period, not a refresh's.
            try:
                await self.refresh_nodes()
            except Exception as exc:
                log.warning("node_refresh_failed", error=str(exc))
        try:
            for name, pool in self._pools.items():
                self._size(name, pool)
            if self.elastic:
                await self._request_scale_up()
        except Exception as exc:
            # One failed pass (a Ray call refused while the GCS recovers) must not end
            # the sizing for good: the next pass starts from the ledger again.
            log.error("pool_sizing_failed", error=str(exc))
            log.debug("pool_sizing_failed_traceback", exc_info=True)

    def _size(self, name: str, pool: RayActorPool) -> None:
        spec = pool.spec
        count = len(pool.actors)
        growing = self._growing.get(name, 0)
        room = self._ledger.room_for_actor(spec.shape, spec.custom_resources)
        if self.elastic:
            self._plan_scale_up(name, spec, count, growing, room)
        if growing:
            return  # one actor at a time: the next decision sees the ledger with it
        wanted = count < spec.min_size or (
            self._scheduler.waiting(name) > 0 and count < spec.max_size
        )
        if wanted and room:
            self._grow(name, pool)
            return
        if count > spec.min_size and self._scheduler.waiting(name) == 0:
            idle = [
                self._ledger.actors[key].info
                for key in self._ledger.idle_actors(name, self._idle_s)
            ]
            if not idle:
                return
            actors_on = Counter(load.info.node_id for load in self._ledger.actors.values())
            order = retirement_order(idle, self._added_nodes(), actors_on)
            for info in order[: count - spec.min_size]:
                self._ledger.remove_actor(info.key)
                pool.remove(info.key)
                log.info("idle_actor_retired", pool=name, actor=info.key, node=info.node_id)

    def _unmanaged_nodes(self) -> set[str]:
        """Nodes the autoscaler did not launch, where that can be told: with node types from
        its config file (autoscaler v1, which measures a request against the nodes it launched
        and its head). Ray's own node types (autoscaler v2) come with a request measured
        against every node, so there no node is left out."""
        if not self._types_from_config:
            return set()
        return unmanaged_nodes(self._ledger.alive_nodes(), self.capacity.node_types)

    def _added_nodes(self) -> set[str]:
        """Nodes that joined since the daemon started, as far as known by the autoscaler."""
        alive = {node.node_id for node in self._ledger.alive_nodes()}
        return alive - self._nodes_at_start - self._unmanaged_nodes()

    def _plan_scale_up(
        self, name: str, spec: PoolSpec, count: int, growing: int, room: bool
    ) -> None:
        wanted = actors_wanted(spec, count, growing, self._scheduler.waiting_requests(name))
        # The actor about to start where there is room needs nothing from the autoscaler.
        self._scale_ups.set(name, max(0, wanted - (1 if room and not growing else 0)))
        if not self._scale_ups.timed_out(name) or count or growing:
            return
        error = ScaleUpTimedOut(name, self._scale_ups.timeout_s)
        ended = self._scheduler.reject_waiting(name, error)
        log.warning("scale_up_timed_out", pool=name, tasks_answered=ended, error=str(error))

    async def _request_scale_up(self) -> None:
        """Ask the autoscaler for a cluster holding every actor plus the pending ones; withdraw
        the request once nothing is pending (idle nodes can then be removed)."""
        bundles = self._scale_up_bundles() if self._scale_ups.any else []
        if bundles == self._requested:
            return
        if self._requested is None and not bundles and not self._taken_work:
            # The first pass withdraws what a previous daemon left, but a standby must not:
            # the request standing is the active daemon's.
            return
        try:
            sent = await asyncio.to_thread(self._send_request, bundles)
        except Exception as exc:
            log.warning("scale_up_request_failed", error=str(exc))
            return
        if not sent:
            return
        log.info(
            "scale_up_requested" if bundles else "scale_up_withdrawn",
            pending={name: self._scale_ups.actors(name) for name in self._pools},
            bundles=len(bundles),
        )

    def _scale_up_bundles(self) -> list[dict[str, float]]:
        """A bundle for every actor placed on capacity the autoscaler counts, and for every
        pending one. Actors on nodes it did not launch are left out: it does not count those
        nodes, so their actors would ask it for nodes to hold them a second time."""
        unmanaged = self._unmanaged_nodes()
        bundles: list[dict[str, float]] = []
        for name, pool in self._pools.items():
            placed = sum(1 for info in pool.actors if info.node_id not in unmanaged)
            bundles.extend([self._bundles[name]] * (placed + self._scale_ups.actors(name)))
        return bundles

    def _send_request(self, bundles: list[dict[str, float]]) -> bool:
        """Send `bundles` as the request standing, unless the pools stopped. Runs in a thread:
        a sizing pass cancelled at shutdown leaves it running, so it records what it sent."""
        with self._request_lock:
            if self._stopped:
                return False
            autoscaling.request_resources(bundles)
            self._requested = bundles
            return True

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
            self._scale_ups.progressed(name)
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
        if self.elastic:
            self._withdraw_request()
        for task in self._background:
            task.cancel()
        for pool in self._pools.values():
            for info in pool.actors:
                self._ledger.remove_actor(info.key)
            pool.stop()

    def _withdraw_request(self) -> None:
        """Withdraw this daemon's request, or the autoscaler keeps nodes for a daemon that is
        gone. A request still being sent is waited for (it would stand after the withdrawal);
        one not sent yet is not sent at all."""
        self._stopped = True
        in_flight_done = self._request_lock.acquire(timeout=REQUEST_IN_FLIGHT_WAIT_S)
        try:
            if not in_flight_done:
                log.warning("scale_up_request_still_in_flight", waited_s=REQUEST_IN_FLIGHT_WAIT_S)
            # Unknown (None): withdrawn by a daemon that took tasks, never by a standby.
            unknown = self._requested is None
            if not (self._taken_work if unknown else self._requested):
                return
            try:
                autoscaling.request_resources([])
            except Exception as exc:
                log.warning("scale_up_withdraw_failed", error=str(exc))
                return
            self._requested = []
            log.info("scale_up_withdrawn", pending={}, bundles=0)
        finally:
            if in_flight_done:
                self._request_lock.release()
