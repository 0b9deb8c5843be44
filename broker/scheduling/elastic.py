"""Scale from zero: what the cluster could hold once its autoscaler adds nodes, and what to ask
the autoscaler for while tasks wait for a pool that has no room.

Plain Python; workers/autoscaling.py reads the node types and sends the requests.

- A pool exists when a node present could hold one of its actors, or, on a cluster with an
  autoscaler, when one of the autoscaler's node types could. Such a pool may have no actor
  at all (its minimum may be 0) and still take tasks: they wait while the cluster grows.
- While a pool wants actors (below its minimum, or tasks waiting) for which no node has room,
  it has a pending scale-up: that many actors of its shape. The autoscaler is asked for a
  cluster that holds every actor of every pool plus the pending ones (Ray's request is "a
  cluster at least this large", measured against node totals, so the actors already placed
  must be in it too), and the request is withdrawn once nothing is pending.
- A pending scale-up that has not added an actor within the timeout gives up: a pool that
  still has no actor answers its waiting tasks `unsatisfiable`.
- Idle actors on nodes added since the daemon started retire first, so that those nodes go
  idle and the autoscaler can remove them.
"""

import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Protocol

from workers.autoscaling import NodeType
from workers.cluster import NodeInfo
from workers.pool import ActorInfo, PoolSpec
from workers.resources import ResourceVector

_EPSILON = 1e-9


class Capacity(Protocol):
    """What placement asks of the cluster: whether a request could ever be held."""

    def could_ever_fit(self, request: ResourceVector) -> bool: ...

    def largest_node(self) -> ResourceVector: ...


class PresentNodes(Protocol):
    """The ledger's view of the nodes there now (broker/scheduling/ledger.py)."""

    def could_ever_fit(self, request: ResourceVector) -> bool: ...

    def largest_node(self) -> ResourceVector: ...

    def could_host(self, shape: ResourceVector, custom: dict[str, float]) -> bool: ...


@dataclass
class ElasticCapacity:
    """The nodes present, and the node types the autoscaler could add."""

    present: PresentNodes
    node_types: list[NodeType] = field(default_factory=list)

    def could_ever_fit(self, request: ResourceVector) -> bool:
        return self.present.could_ever_fit(request) or any(
            node_type.could_host(request, {}) for node_type in self.node_types
        )

    def largest_node(self) -> ResourceVector:
        largest = self.present.largest_node()
        for node_type in self.node_types:
            if node_type.max_count == 0:
                continue
            total = node_type.total
            largest = ResourceVector(
                cpus=max(largest.cpus, total.cpus),
                gpus=max(largest.gpus, total.gpus),
                memory_mb=max(largest.memory_mb, total.memory_mb),
            )
        return largest

    def could_host(self, spec: PoolSpec) -> bool:
        """A node present, or one the autoscaler could add, could hold an actor of `spec`."""
        return self.present.could_host(spec.shape, spec.custom_resources) or any(
            node_type.could_host(spec.shape, spec.custom_resources) for node_type in self.node_types
        )


def tasks_per_actor(spec: PoolSpec, request: ResourceVector) -> int:
    """How many tasks asking `request` one actor of `spec` runs at once."""
    fits = spec.max_concurrency
    for asked, held in (
        (request.cpus, spec.shape.cpus),
        (request.gpus, spec.shape.gpus),
        (request.memory_mb, spec.shape.memory_mb),
    ):
        if asked > 0:
            fits = min(fits, int(held / asked + _EPSILON))
    return max(1, fits)


def actors_wanted(
    spec: PoolSpec, actors: int, starting: int, waiting: Counter[ResourceVector]
) -> int:
    """Actors `spec`'s pool wants beyond those it has and those starting: up to its minimum,
    and as many as its waiting tasks fill (never past its maximum)."""
    have = actors + starting
    below_min = spec.min_size - have
    for_waiting = 0
    if waiting:
        fill = sum(count / tasks_per_actor(spec, request) for request, count in waiting.items())
        for_waiting = math.ceil(fill - _EPSILON)
    return max(0, min(spec.max_size - have, max(below_min, for_waiting)))


@dataclass
class ScaleUp:
    """One pool's pending scale-up: actors asked for, and since when (monotonic seconds)."""

    actors: int = 0
    since_s: float | None = None


class ScaleUps:
    """The pending scale-ups of all pools, and their timeout."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._pending: dict[str, ScaleUp] = {}

    def set(self, pool: str, actors: int, now_s: float | None = None) -> None:
        now_s = time.monotonic() if now_s is None else now_s
        state = self._pending.setdefault(pool, ScaleUp())
        state.actors = actors
        if actors == 0:
            state.since_s = None
        elif state.since_s is None:
            state.since_s = now_s

    def progressed(self, pool: str, now_s: float | None = None) -> None:
        """An actor joined `pool`: the cluster grows, so its timeout starts again."""
        state = self._pending.get(pool)
        if state is not None and state.since_s is not None:
            state.since_s = time.monotonic() if now_s is None else now_s

    def timed_out(self, pool: str, now_s: float | None = None) -> bool:
        """Whether `pool`'s scale-up has waited past the timeout; if so it starts again."""
        state = self._pending.get(pool)
        if state is None or state.since_s is None:
            return False
        now_s = time.monotonic() if now_s is None else now_s
        if now_s - state.since_s < self.timeout_s:
            return False
        state.since_s = now_s
        return True

    def actors(self, pool: str) -> int:
        state = self._pending.get(pool)
        return 0 if state is None else state.actors

    def waiting_since(self, pool: str) -> float | None:
        state = self._pending.get(pool)
        return None if state is None else state.since_s

    @property
    def any(self) -> bool:
        return any(state.actors for state in self._pending.values())


def memory_in_bundle(spec: PoolSpec, node_types: Sequence[NodeType]) -> bool:
    """Whether the bundle of `spec`'s actor asks for its memory: only where a node type that
    states its memory could hold the actor, so that the autoscaler picks one with enough. A
    type that does not state it has none as far as a request is concerned, so where only such
    types could hold the actor, a bundle asking for memory would fit no type at all. Decided
    per pool: the memory pool's types may state memory where the GPU pool's do not."""
    return spec.shape.memory_mb > 0 and any(
        node_type.declares_memory and node_type.could_host(spec.shape, spec.custom_resources)
        for node_type in node_types
    )


def _is_of_type(node: NodeInfo, node_type: NodeType) -> bool:
    """Whether `node` has the CPUs, GPUs and custom resources `node_type` states (memory is
    left out: a node's is measured when it starts, never exactly what a type states)."""
    return (
        node.total.cpus == node_type.total.cpus
        and node.total.gpus == node_type.total.gpus
        and all(node.custom.get(name) == amount for name, amount in node_type.custom.items())
    )


def unmanaged_nodes(nodes: Iterable[NodeInfo], node_types: Sequence[NodeType]) -> set[str]:
    """Ids of the nodes that are of no node type the autoscaler knows (its head's included):
    nodes it did not launch and does not count when it measures a request. Empty where some
    type states no resources (the autoscaler then takes them from the node, so any node could
    be of that type)."""
    if any(not node_type.total.cpus and not node_type.custom for node_type in node_types):
        return set()
    return {
        node.node_id
        for node in nodes
        if not any(_is_of_type(node, node_type) for node_type in node_types)
    }


def retirement_order(
    idle: Sequence[ActorInfo], added_nodes: Set[str], actors_on: Mapping[str, int]
) -> list[ActorInfo]:
    """`idle` (oldest first) in the order to retire them: first the actors on nodes added since
    the daemon started (the autoscaler removes a node only once nothing runs on it, and a CPU
    actor may have landed on a GPU or memory node too), then the others; within each, those
    on the nodes holding fewest actors first (emptied soonest), then the newest."""
    ranked = sorted(
        enumerate(idle),
        key=lambda item: (
            item[1].node_id not in added_nodes,
            actors_on.get(item[1].node_id, 0),
            -item[0],
        ),
    )
    return [info for _, info in ranked]
