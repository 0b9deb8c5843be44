"""The resource manager's ledger: what the cluster has, what pools reserve, what tasks use.

Plain Python, driven by the pools (actors added and removed), the cluster adapter (nodes joined
and lost) and the scheduler (tasks placed and finished). It never over-commits: a task is placed
on an actor only while the tasks on that actor together fit the actor's reservation, and an
actor's reservation was granted by Ray on one node.

Placing a task is on every task's path, so it does not scan the actors: each pool keeps an
index of the actors that can take tasks, grouped by state (broker/scheduling/room_index.py),
and the nodes' distinct sizes are kept for the per-task "could this ever fit" check. Both are
updated by the methods below, which are the only writers of `nodes`, `actors` and each
actor's load.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from broker.scheduling.room_index import RoomIndex
from workers.cluster import NodeInfo
from workers.pool import ActorInfo
from workers.resources import ZERO, ResourceVector


@dataclass
class ActorLoad:
    info: ActorInfo
    used: ResourceVector = ZERO
    running: int = 0
    idle_since_s: float = field(default_factory=time.monotonic)
    # Takes no new tasks; stopped once its running tasks end (a stuck sync handler's thread).
    draining: bool = False
    # Order of arrival in the ledger: ties between equally loaded actors go to the first.
    arrival: int = 0

    def has_room_for(self, request: ResourceVector) -> bool:
        return self.running < self.info.max_concurrency and (self.used + request).fits_in(
            self.info.shape
        )


@dataclass
class Ledger:
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    actors: dict[str, ActorLoad] = field(default_factory=dict)
    # Per pool, its actors that can take tasks (alive node, not draining), by state.
    _rooms: dict[str, RoomIndex] = field(default_factory=dict, init=False, repr=False)
    # Per pool and per node, the keys of their actors (in the order they were added).
    _by_pool: dict[str, dict[str, ActorLoad]] = field(default_factory=dict, init=False, repr=False)
    _by_node: dict[str, dict[str, ActorLoad]] = field(default_factory=dict, init=False, repr=False)
    _draining: set[str] = field(default_factory=set, init=False, repr=False)
    _alive: frozenset[str] = field(default=frozenset(), init=False, repr=False)
    # The distinct totals of the alive nodes (a cluster has few node types), and for which
    # node table they were computed.
    _totals: list[ResourceVector] = field(default_factory=list, init=False, repr=False)
    _totals_of: dict[str, NodeInfo] | None = field(default=None, init=False, repr=False)
    _arrivals: int = field(default=0, init=False, repr=False)

    # -- the cluster -------------------------------------------------------------------------
    def set_nodes(self, nodes: Iterable[NodeInfo]) -> list[str]:
        """Replace the node table; return the ids of nodes that are gone or dead now."""
        self.nodes = {node.node_id: node for node in nodes}
        alive = frozenset(node_id for node_id, node in self.nodes.items() if node.alive)
        if alive != self._alive:
            self._alive = alive
            for load in self.actors.values():
                self._reindex(load)
        return [
            load.info.node_id
            for load in self.actors.values()
            if not self._node_alive(load.info.node_id)
        ]

    def _node_alive(self, node_id: str) -> bool:
        node = self.nodes.get(node_id)
        return node is not None and node.alive

    def alive_nodes(self) -> list[NodeInfo]:
        return [node for node in self.nodes.values() if node.alive]

    def _alive_totals(self) -> list[ResourceVector]:
        if self._totals_of is not self.nodes:
            self._totals = list(dict.fromkeys(node.total for node in self.alive_nodes()))
            self._totals_of = self.nodes
        return self._totals

    def could_ever_fit(self, request: ResourceVector) -> bool:
        """Whether some alive node is large enough, counting nothing as used."""
        for total in self._alive_totals():  # noqa: SIM110 (a loop, not any(): on every task)
            if request.fits_in(total):
                return True
        return False

    def largest_node(self) -> ResourceVector:
        totals = self._alive_totals()
        if not totals:
            return ZERO
        return ResourceVector(
            cpus=max(t.cpus for t in totals),
            gpus=max(t.gpus for t in totals),
            memory_mb=max(t.memory_mb for t in totals),
        )

    # -- actors ------------------------------------------------------------------------------
    def add_actor(self, info: ActorInfo) -> None:
        old = self.actors.get(info.key)
        if old is not None:
            self._forget(old)  # the same key again: it keeps its place in the order
            arrival = old.arrival
        else:
            arrival = self._arrivals
            self._arrivals += 1
        load = ActorLoad(info, arrival=arrival)
        self.actors[info.key] = load
        self._by_pool.setdefault(info.pool, {})[info.key] = load
        self._by_node.setdefault(info.node_id, {})[info.key] = load
        self._reindex(load)

    def remove_actor(self, key: str) -> None:
        load = self.actors.pop(key, None)
        if load is not None:
            self._forget(load)

    def _forget(self, load: ActorLoad) -> None:
        key, info = load.info.key, load.info
        rooms = self._rooms.get(info.pool)
        if rooms is not None:
            rooms.remove(key)
        for table, name in ((self._by_pool, info.pool), (self._by_node, info.node_id)):
            members = table.get(name)
            if members is not None:
                members.pop(key, None)
                if not members:
                    del table[name]
        self._draining.discard(key)

    def _reindex(self, load: ActorLoad) -> None:
        """Put `load` in its pool's index in its current state, or out of it when it cannot
        take tasks."""
        info = load.info
        rooms = self._rooms.get(info.pool)
        if rooms is None:
            rooms = self._rooms[info.pool] = RoomIndex()
        rooms.remove(info.key)
        if not load.draining and info.node_id in self._alive:
            rooms.add(
                info.key,
                load.arrival,
                load.running,
                load.used,
                info.shape,
                info.max_concurrency,
            )

    # -- tasks -------------------------------------------------------------------------------
    def place(self, pool: str, request: ResourceVector) -> ActorInfo | None:
        """Reserve room for one task on the least-loaded actor of `pool` that has it."""
        rooms = self._rooms.get(pool)
        if rooms is None:
            return None
        key = rooms.best(request)
        if key is None:
            return None
        best = self.actors[key]
        best.used = best.used + request
        best.running += 1
        rooms.move(key, best.running, best.used, fuller=True)
        return best.info

    def drain(self, key: str) -> None:
        load = self.actors.get(key)
        if load is not None:
            load.draining = True
            self._draining.add(key)
            self._reindex(load)

    def drained(self) -> list[str]:
        """Draining actors whose last task has ended: ready to stop."""
        if not self._draining:  # on every task's path: most of the time none drains
            return []
        return sorted(
            (key for key in self._draining if self.actors[key].running == 0),
            key=lambda key: self.actors[key].arrival,
        )

    def idle_actors(self, pool: str, idle_s: float, now_s: float | None = None) -> list[str]:
        """Keys of `pool`'s actors that have run nothing for at least `idle_s`."""
        now_s = time.monotonic() if now_s is None else now_s
        return [
            key
            for key, load in self._by_pool.get(pool, {}).items()
            if load.running == 0 and now_s - load.idle_since_s >= idle_s
        ]

    def room_for_actor(self, shape: ResourceVector, custom: dict[str, float]) -> bool:
        """Whether some alive node has, beyond what our actors reserve, room for one more
        actor of `shape` that needs the custom resources `custom`."""
        for node in self.alive_nodes():
            if any(node.custom.get(name, 0.0) < amount for name, amount in custom.items()):
                continue
            if shape.fits_in(node.total - self.reserved_on(node.node_id)):
                return True
        return False

    def could_host(self, shape: ResourceVector, custom: dict[str, float]) -> bool:
        """Whether some alive node could hold one actor of `shape`, counting nothing used."""
        return any(
            shape.fits_in(node.total)
            and all(node.custom.get(name, 0.0) >= amount for name, amount in custom.items())
            for node in self.alive_nodes()
        )

    def finish(self, key: str, request: ResourceVector) -> None:
        """Give back a task's share. A no-op for an actor already removed (it took its share)."""
        load = self.actors.get(key)
        if load is None:
            return
        load.used = load.used - request
        load.running -= 1
        if load.running == 0:
            load.idle_since_s = time.monotonic()
        rooms = self._rooms.get(load.info.pool)
        if rooms is not None:
            rooms.move(key, load.running, load.used, fuller=False)

    # -- reporting ---------------------------------------------------------------------------
    def reserved_on(self, node_id: str) -> ResourceVector:
        total = ZERO
        for load in self._by_node.get(node_id, {}).values():
            total = total + load.info.shape
        return total

    def pool_view(self, pool: str) -> dict[str, object]:
        loads = list(self._by_pool.get(pool, {}).values())
        reserved = sum((load.info.shape for load in loads), ZERO)
        used = sum((load.used for load in loads), ZERO)
        return {
            "actors": len(loads),
            "reserved": reserved.as_dict(),
            "used": used.as_dict(),
            "free": (reserved - used).as_dict(),
            "running": sum(load.running for load in loads),
        }

    def node_view(self, node: NodeInfo) -> dict[str, object]:
        reserved = self.reserved_on(node.node_id)
        loads = self._by_node.get(node.node_id, {}).values()
        return {
            "node_id": node.node_id,
            "alive": node.alive,
            "address": node.address,
            "total": node.total.as_dict(),
            "custom": dict(node.custom),
            "reserved": reserved.as_dict(),
            "free": (node.total - reserved).as_dict(),
            "actors": len(loads),
            "running": sum(load.running for load in loads),
        }
