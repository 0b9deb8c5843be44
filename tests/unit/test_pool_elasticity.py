"""PoolSet on an elastic cluster, Ray faked (tests/unit/fakes/ray.py): what it asks the
autoscaler for and when it withdraws it, which idle actors it retires first, and node tables
read concurrently. Sizing passes are run by hand (`size_once`), never by the loop's timer."""

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from fakes.ray import HOLD_LIMIT_S, FakeRay
from fakes.sync import Changes

from broker.errors import ScaleUpTimedOut
from broker.scheduling.ledger import Ledger
from broker.scheduling.pools import PoolSet
from broker.scheduling.scheduler import Scheduler
from workers.autoscaling import NodeType
from workers.cluster import NodeInfo
from workers.pool import ActorInfo, PoolSpec
from workers.resources import ResourceVector

MIB = 1024 * 1024
MARK = "swarm_memory_node"

HEAD = NodeInfo("head", True, "10.0.0.1", ResourceVector(cpus=2.0))
GPU_NODE = NodeInfo("gpu-1", True, "10.0.0.2", ResourceVector(cpus=4.0, gpus=2.0))
# Joined to the cluster by hand: of no type the autoscaler knows.
STATIC_NODE = NodeInfo("static", True, "10.0.0.3", ResourceVector(cpus=16.0))

HEAD_TYPE = NodeType("head", ResourceVector(cpus=2.0), max_count=1)
GPU_TYPE = NodeType("gpu", ResourceVector(cpus=4.0, gpus=2.0), max_count=2)
MEMORY_TYPE = NodeType(
    "memory",
    ResourceVector(cpus=4.0, memory_mb=64 * 1024),
    {MARK: 1.0},
    max_count=1,
    declares_memory=True,
)
NODE_TYPES = [HEAD_TYPE, GPU_TYPE]
CONFIG_FILE = """
head_node_type: head
available_node_types:
  head: {resources: {CPU: 2}}
  gpu: {resources: {CPU: 4, GPU: 2}, max_workers: 2}
"""

CPU = PoolSpec("cpu", 1, 4, ResourceVector(cpus=1.0))
GPU = PoolSpec("gpu", 0, 4, ResourceVector(cpus=1.0, gpus=1.0))
CPU_BUNDLE = {"CPU": 1.0}
GPU_BUNDLE = {"CPU": 1.0, "GPU": 1.0}
ONE_CPU = ResourceVector(cpus=1.0)
ONE_GPU = ResourceVector(gpus=1.0)


class ElasticPools:
    """A PoolSet on FakeRay and the scheduler it sizes for; tasks arrive as acquires."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        nodes: list[NodeInfo],
        node_types: list[NodeType] | None = NODE_TYPES,
        specs: tuple[PoolSpec, ...] = (CPU, GPU),
        *,
        idle_s: float = 60.0,
        autoscaler_config: Path | None = None,
    ) -> None:
        self.changes = Changes()
        self.ray = FakeRay(self.changes, nodes, node_types)
        self.ray.install(monkeypatch)
        self.scheduler = Scheduler(Ledger())
        self.ledger = self.scheduler.ledger
        self.pools = PoolSet(
            list(specs), [], self.scheduler, idle_s, autoscaler_config=autoscaler_config
        )
        self.tasks: list[asyncio.Task[ActorInfo]] = []
        sizing_needed = self.scheduler.on_pool_waiting

        def waiting(pool: str) -> None:
            sizing_needed(pool)
            self.changes.notify()

        self.scheduler.on_pool_waiting = waiting

    async def send(self, pool: str, request: ResourceVector, count: int, waits: int) -> None:
        """`count` tasks asking `request` of `pool`, `waits` of them left waiting."""
        already = self.scheduler.waiting(pool)
        self.tasks += [
            asyncio.create_task(self.scheduler.acquire(pool, request, 0, "tests"))
            for _ in range(count)
        ]
        await self.until(lambda: self.scheduler.waiting(pool) == already + waits, "waiters")

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        await self.changes.until(predicate, what)

    def finish_all(self, request: ResourceVector) -> None:
        """Every task placed ends, giving its room back."""
        for task in self.tasks:
            if task.done() and task.exception() is None:
                info = task.result()
                self.scheduler.release(info.pool, info, request)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.pools.stop()


Make = Callable[..., ElasticPools]


@pytest.fixture
async def make(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Make]:
    """ElasticPools(monkeypatch, ...) for the test, closed however the test ends."""
    made: list[ElasticPools] = []

    def make(*args: Any, **options: Any) -> ElasticPools:
        made.append(ElasticPools(monkeypatch, *args, **options))
        return made[-1]

    yield make
    for elastic in made:
        await elastic.close()


async def test_waiting_tasks_ask_for_every_actor_plus_the_pending_ones_until_none_wait(
    make: Make,
) -> None:
    elastic = make([HEAD])
    await elastic.pools.start_pools()
    assert [a.node_id for a in elastic.pools.actors("cpu")] == ["head"]
    assert elastic.pools.actors("gpu") == []  # started from zero: no node holds one

    await elastic.send("gpu", ONE_GPU, 3, waits=3)
    await elastic.pools.size_once()
    assert elastic.pools.scale_up("gpu") == 3
    assert elastic.ray.requests == [[CPU_BUNDLE, GPU_BUNDLE, GPU_BUNDLE, GPU_BUNDLE]]
    await elastic.pools.size_once()
    assert len(elastic.ray.requests) == 1  # the same request is not sent again

    elastic.scheduler.reject_waiting("gpu", ScaleUpTimedOut("gpu", 1.0))
    await elastic.pools.size_once()
    assert elastic.pools.scale_up("gpu") == 0
    assert elastic.ray.requests[-1] == []  # withdrawn: the autoscaler may remove idle nodes


async def test_a_daemon_that_took_tasks_withdraws_a_request_left_by_a_previous_one(
    make: Make,
) -> None:
    # A crashed daemon's request stands in Ray; this one has never sent any. Its CPU tasks
    # grow the pool on the head: nothing is pending, so its request is the empty one.
    elastic = make([HEAD])
    await elastic.pools.start_pools()
    await elastic.send("cpu", ONE_CPU, 2, waits=1)
    await elastic.pools.size_once()
    assert elastic.pools.scale_up("cpu") == 0
    assert elastic.ray.requests == [[]]


async def test_a_standby_neither_replaces_nor_withdraws_the_active_daemons_request(
    make: Make,
) -> None:
    elastic = make([HEAD])
    await elastic.pools.start_pools()
    await elastic.pools.size_once()  # no task reached it
    elastic.pools.stop()
    assert elastic.ray.requests == []


async def test_stop_waits_for_a_request_in_flight_and_then_withdraws_it(make: Make) -> None:
    elastic = make([HEAD])
    await elastic.pools.start_pools()
    await elastic.send("gpu", ONE_GPU, 2, waits=2)
    hold = elastic.ray.hold_next_request()
    sizing = asyncio.create_task(elastic.pools.size_once())
    await asyncio.to_thread(hold.started.wait, HOLD_LIMIT_S)  # sent, not yet taken by Ray

    # The request is taken while stop() runs (before or while it waits): either way the
    # withdrawal must come after it, or the request would stand for a daemon that is gone.
    releaser = threading.Thread(target=hold.release)
    releaser.start()
    elastic.pools.stop()
    releaser.join()
    await sizing
    assert elastic.ray.requests == [[CPU_BUNDLE, GPU_BUNDLE, GPU_BUNDLE], []]


async def test_idle_actors_on_nodes_added_since_start_retire_first(make: Make) -> None:
    elastic = make([HEAD], specs=(CPU,), idle_s=0.0)
    await elastic.pools.start_pools()
    elastic.ray.join(GPU_NODE)  # the autoscaler added it (for GPU tasks, say)
    await elastic.pools.refresh_nodes()

    # Three 1-CPU tasks: the pool grows to the head's last CPU, then onto the GPU node.
    await elastic.send("cpu", ONE_CPU, 3, waits=2)
    for actors, waiting in ((2, 1), (3, 0)):
        await elastic.pools.size_once()
        await elastic.until(
            lambda a=actors, w=waiting: (
                len(elastic.pools.actors("cpu")) == a and elastic.scheduler.waiting("cpu") == w
            ),
            f"{actors} actors",
        )
    assert len(elastic.ray.actors_on("gpu-1")) == 1

    elastic.finish_all(ONE_CPU)
    await elastic.pools.size_once()
    # Down to the minimum (1), keeping an actor on the head: the added node holds none, so
    # the autoscaler can remove it.
    assert [a.node_id for a in elastic.pools.actors("cpu")] == ["head"]
    assert elastic.ray.actors_on("gpu-1") == []
    assert set(elastic.ledger.actors) == {a.key for a in elastic.pools.actors("cpu")}


@pytest.mark.parametrize("types_from", ["config_file", "ray"])
async def test_actors_on_nodes_the_autoscaler_did_not_launch_are_left_out_of_the_request(
    make: Make, tmp_path: Path, types_from: str
) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(CONFIG_FILE)
    at_least_three = PoolSpec("cpu", 3, 4, ResourceVector(cpus=1.0))
    elastic = make(
        [HEAD, STATIC_NODE],
        node_types=NODE_TYPES if types_from == "ray" else None,
        specs=(at_least_three, GPU),
        autoscaler_config=config,
    )
    await elastic.pools.start_pools()
    assert sorted(a.node_id for a in elastic.pools.actors("cpu")) == ["head", "head", "static"]
    await elastic.send("gpu", ONE_GPU, 1, waits=1)
    await elastic.pools.size_once()
    if types_from == "config_file":
        # Autoscaler v1 measures a request against the nodes it launched (and its head):
        # the actor on the static node would ask it for a node to hold it again.
        assert elastic.ray.requests == [[CPU_BUNDLE, CPU_BUNDLE, GPU_BUNDLE]]
    else:
        # Ray's own node types (autoscaler v2): measured against every node, all counted.
        assert elastic.ray.requests == [[CPU_BUNDLE, CPU_BUNDLE, CPU_BUNDLE, GPU_BUNDLE]]


async def test_memory_is_asked_for_by_the_pools_a_type_stating_its_memory_could_hold(
    make: Make,
) -> None:
    # GPU actors reserve memory too, but the GPU type does not state its memory: a bundle
    # asking for memory would fit no GPU node. The memory type states its memory.
    gpu = PoolSpec("gpu", 0, 2, ResourceVector(cpus=1.0, gpus=1.0, memory_mb=2048))
    memory = PoolSpec(
        "memory", 0, 2, ResourceVector(cpus=1.0, memory_mb=4096), custom_resources={MARK: 0.001}
    )
    elastic = make([HEAD], [HEAD_TYPE, GPU_TYPE, MEMORY_TYPE], specs=(CPU, gpu, memory))
    await elastic.pools.start_pools()
    await elastic.send("gpu", ONE_GPU, 1, waits=1)
    await elastic.send("memory", ResourceVector(cpus=1.0, memory_mb=3000), 1, waits=1)
    await elastic.pools.size_once()
    memory_bundle = {"CPU": 1.0, "memory": 4096.0 * MIB, MARK: 0.001}
    assert elastic.ray.requests == [[CPU_BUNDLE, GPU_BUNDLE, memory_bundle]]


async def test_a_node_table_read_before_one_already_applied_is_dropped(make: Make) -> None:
    elastic = make([HEAD])
    await elastic.pools.start_pools()
    hold = elastic.ray.hold_next_read()
    slow = asyncio.create_task(elastic.pools.refresh_nodes())
    await asyncio.to_thread(hold.started.wait, HOLD_LIMIT_S)  # its table: the head alone

    elastic.ray.join(GPU_NODE)
    await elastic.pools.refresh_nodes()  # begun later, ends first: the GPU node is seen
    assert "gpu-1" in elastic.ledger.nodes
    hold.release()
    await slow
    assert "gpu-1" in elastic.ledger.nodes  # the slow, older table did not undo it
