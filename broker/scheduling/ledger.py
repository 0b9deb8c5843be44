"""The resource manager's ledger: what the cluster has, what pools reserve, what tasks use.

Plain Python, driven by the pools (actors added and removed), the cluster adapter (nodes joined
and lost) and the scheduler (tasks placed and finished). It never over-commits: a task is placed
on an actor only while the tasks on that actor together fit the actor's reservation, and an
actor's reservation was granted by Ray on one node.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

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

    def has_room_for(self, request: ResourceVector) -> bool:
        return self.running < self.info.max_concurrency and (self.used + request).fits_in(
            self.info.shape
        )


@dataclass
class Ledger:
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    actors: dict[str, ActorLoad] = field(default_factory=dict)

    # -- the cluster -------------------------------------------------------------------------
    def set_nodes(self, nodes: Iterable[NodeInfo]) -> list[str]:
        """Replace the node table; return the ids of nodes that are gone or dead now."""
        self.nodes = {node.node_id: node for node in nodes}
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

    def could_ever_fit(self, request: ResourceVector) -> bool:
        """Whether some alive node is large enough, counting nothing as used."""
        return any(request.fits_in(node.total) for node in self.alive_nodes())

    def largest_node(self) -> ResourceVector:
        alive = self.alive_nodes()
        if not alive:
            return ZERO
        return ResourceVector(
            cpus=max(n.total.cpus for n in alive),
            gpus=max(n.total.gpus for n in alive),
            memory_mb=max(n.total.memory_mb for n in alive),
        )

    # -- actors ------------------------------------------------------------------------------
    def add_actor(self, info: ActorInfo) -> None:
        self.actors[info.key] = ActorLoad(info)

    def remove_actor(self, key: str) -> None:
        self.actors.pop(key, None)

    # -- tasks -------------------------------------------------------------------------------
    def place(self, pool: str, request: ResourceVector) -> ActorInfo | None:
        """Reserve room for one task on the least-loaded actor of `pool` that has it."""
        best: ActorLoad | None = None
        for load in self.actors.values():
            if load.info.pool != pool or load.draining or not self._node_alive(load.info.node_id):
                continue
            if load.has_room_for(request) and (best is None or load.running < best.running):
                best = load
        if best is None:
            return None
        best.used = best.used + request
        best.running += 1
        return best.info

    def drain(self, key: str) -> None:
        load = self.actors.get(key)
        if load is not None:
            load.draining = True

    def drained(self) -> list[str]:
        """Draining actors whose last task has ended: ready to stop."""
        return [key for key, load in self.actors.items() if load.draining and load.running == 0]

    def idle_actors(self, pool: str, idle_s: float, now_s: float | None = None) -> list[str]:
        """Keys of `pool`'s actors that have run nothing for at least `idle_s`."""
        now_s = time.monotonic() if now_s is None else now_s
        return [
            key
            for key, load in self.actors.items()
            if load.info.pool == pool and load.running == 0 and now_s - load.idle_since_s >= idle_s
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

    # -- reporting ---------------------------------------------------------------------------
    def reserved_on(self, node_id: str) -> ResourceVector:
        total = ZERO
        for load in self.actors.values():
            if load.info.node_id == node_id:
                total = total + load.info.shape
        return total

    def pool_view(self, pool: str) -> dict[str, object]:
        loads = [load for load in self.actors.values() if load.info.pool == pool]
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
        return {
            "node_id": node.node_id,
            "alive": node.alive,
            "address": node.address,
            "total": node.total.as_dict(),
            "custom": dict(node.custom),
            "reserved": reserved.as_dict(),
            "free": (node.total - reserved).as_dict(),
            "actors": sum(1 for a in self.actors.values() if a.info.node_id == node.node_id),
            "running": sum(
                a.running for a in self.actors.values() if a.info.node_id == node.node_id
            ),
        }
