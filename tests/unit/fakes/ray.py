"""Ray's side of PoolSet in memory: the cluster's nodes, the node types its autoscaler reports,
the requests sent to that autoscaler, and actor pools whose actors land on the nodes.

`FakeRay.install(monkeypatch)` puts it where broker/scheduling/pools.py calls Ray
(`read_nodes`, `RayActorPool`, and `workers.autoscaling`'s `node_types_from_ray` and
`request_resources`); no Ray runs and no autoscaler is asked anything.

PoolSet calls `read_nodes` and `request_resources` in threads (asyncio.to_thread): a test can
hold one such call in flight (`hold_next_read`, `hold_requests`) with threading events.
"""

import itertools
import threading
from typing import Any

import pytest

import broker.scheduling.pools as pools_module
from workers import autoscaling
from workers.autoscaling import NodeType
from workers.cluster import NodeInfo
from workers.errors import WorkerError
from workers.pool import ActorInfo, PoolSpec
from workers.resources import ZERO, ResourceVector

from .sync import Changes

# How long a held call waits for its release before the test is failed, not hung.
HOLD_LIMIT_S = 5.0


class Hold:
    """One call held in its thread: `started` once it is called, it returns once `release`d."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.released = threading.Event()

    def release(self) -> None:
        self.released.set()

    def wait_released(self) -> None:
        self.started.set()
        if not self.released.wait(HOLD_LIMIT_S):
            raise AssertionError("a held call was never released")


class FakeActorPool:
    """RayActorPool's surface that PoolSet uses; its actors land where FakeRay puts them."""

    def __init__(
        self, ray: "FakeRay", spec: PoolSpec, handler_modules: list[str], env: dict[str, str]
    ) -> None:
        self.spec = spec
        self._ray = ray
        self._infos: dict[str, ActorInfo] = {}
        self._serial = itertools.count()

    @property
    def actors(self) -> list[ActorInfo]:
        return list(self._infos.values())

    async def start(self) -> list[ActorInfo]:
        return [await self.add_actor() for _ in range(self.spec.min_size)]

    async def add_actor(self) -> ActorInfo:
        key = f"{self.spec.name}-{next(self._serial)}"
        node_id = self._ray.place(self.spec)
        info = ActorInfo(key, self.spec.name, node_id, self.spec.shape, self.spec.max_concurrency)
        self._infos[key] = info
        self._ray.changes.notify()
        return info

    def remove(self, key: str) -> ActorInfo | None:
        return self._infos.pop(key, None)

    def stop(self) -> None:
        self._infos.clear()


class FakeRay:
    """The cluster, its autoscaler and the actor pools; see the module docstring.

    `node_types`: what Ray reports (autoscaler v2); None, as on a cluster whose node types
    only the autoscaler's config file names. `requests`: every request_resources call, in
    order. `land_on`: the node the next actors land on (None: the first with room)."""

    def __init__(
        self,
        changes: Changes,
        nodes: list[NodeInfo],
        node_types: list[NodeType] | None = None,
    ) -> None:
        self.changes = changes
        self.nodes = list(nodes)
        self.node_types = node_types
        self.requests: list[list[dict[str, float]]] = []
        self.pools: dict[str, FakeActorPool] = {}
        self.land_on: str | None = None
        self._held_reads: list[Hold] = []
        self._request_hold: Hold | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(pools_module, "read_nodes", self._read_nodes)
        monkeypatch.setattr(pools_module, "RayActorPool", self._pool)
        monkeypatch.setattr(autoscaling, "node_types_from_ray", lambda: self.node_types)
        monkeypatch.setattr(autoscaling, "request_resources", self._request_resources)

    # -- what the test does ------------------------------------------------------------------
    def join(self, node: NodeInfo) -> None:
        self.nodes.append(node)

    def hold_next_read(self) -> Hold:
        """The next read of the nodes takes its table when called, and returns it once
        released."""
        hold = Hold()
        self._held_reads.append(hold)
        return hold

    def hold_next_request(self) -> Hold:
        """The next request to the autoscaler is taken once released."""
        self._request_hold = Hold()
        return self._request_hold

    def actors_on(self, node_id: str) -> list[str]:
        return [
            info.key
            for pool in self.pools.values()
            for info in pool.actors
            if info.node_id == node_id
        ]

    # -- what PoolSet calls ------------------------------------------------------------------
    def _pool(self, spec: PoolSpec, handler_modules: list[str], env: dict[str, str]) -> Any:
        pool = FakeActorPool(self, spec, handler_modules, env)
        self.pools[spec.name] = pool
        return pool

    def _read_nodes(self) -> list[NodeInfo]:
        table = list(self.nodes)
        if self._held_reads:
            self._held_reads.pop(0).wait_released()
        return table

    def _request_resources(self, bundles: list[dict[str, float]]) -> None:
        hold, self._request_hold = self._request_hold, None
        if hold is not None:
            hold.wait_released()
        self.requests.append([dict(bundle) for bundle in bundles])

    def place(self, spec: PoolSpec) -> str:
        """Where Ray would put an actor of `spec`: `land_on`, else the first node with room."""
        if self.land_on is not None:
            return self.land_on
        for node in self.nodes:
            marked = all(
                node.custom.get(name, 0.0) >= amount
                for name, amount in spec.custom_resources.items()
            )
            if node.alive and marked and spec.shape.fits_in(node.total - self._reserved(node)):
                return node.node_id
        raise WorkerError(f"no node has room for a {spec.name} actor")

    def _reserved(self, node: NodeInfo) -> ResourceVector:
        total = ZERO
        for pool in self.pools.values():
            for info in pool.actors:
                if info.node_id == node.node_id:
                    total = total + info.shape
        return total
