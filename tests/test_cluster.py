"""Placement across a multi-node Ray cluster: a head node, a node with (logical) GPUs, a
memory node and plain CPU nodes, each task landing where the rules say."""

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonFactory, when_waiting
from raw import RawProducer, task
from ray.cluster_utils import Cluster

from broker.daemon import Daemon

MEMORY_MARK = {"swarm_memory_node": 1.0}
GIB = 1024**3


class Nodes:
    """Worker nodes added for one test and removed after it."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.added: list[Any] = []

    def add(self, **node_args: Any) -> str:
        node = self.cluster.add_node(**node_args)
        self.added.append(node)
        self.cluster.wait_for_nodes()
        return str(node.node_id)

    def remove(self, node_id: str) -> None:
        node = next(n for n in self.added if n.node_id == node_id)
        self.added.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def remove_all(self) -> None:
        for node in self.added:
            self.cluster.remove_node(node)
        self.added.clear()
        self.cluster.wait_for_nodes()


@pytest.fixture
def nodes(ray_cluster: Cluster) -> Iterator[Nodes]:
    """Request it before the daemon, so the daemon stops before its nodes go."""
    added = Nodes(ray_cluster)
    yield added
    added.remove_all()


async def _replies(producer: RawProducer, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    inbox = await producer.inbox()
    for body in bodies:
        await producer.publish(body["type"], body, reply_to=inbox.name)
    await inbox.wait_until(lambda _: len(inbox.distinct_ids()) == len(bodies), timeout_s=120)
    return {r.payload["id"]: r.payload for r in inbox.messages}


async def test_each_task_lands_on_the_pool_and_node_that_suit_it(
    nodes: Nodes, start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    gpu_node = nodes.add(num_cpus=2, num_gpus=2)
    memory_node = nodes.add(num_cpus=2, memory=16 * GIB, resources=MEMORY_MARK)
    nodes.add(num_cpus=2)
    daemon = await start_daemon(handler_modules=["workers.diagnostics"], gpu_pool_max=2)
    assert daemon.pools.names == {"cpu", "gpu", "memory"}

    replies = await _replies(
        producer,
        [
            task("training", "pid", id="train"),
            task("inference", "pid", id="infer"),
            task("data_processing", "pid", id="data"),
            task("data_processing", "pid", id="big", resources={"memory_mb": 3000}),
            task("data_processing", "pid", id="pinned-gpu", pool="gpu"),
            task("data_processing", "pid", id="asks-gpu", resources={"gpus": 0.5}),
            task("training", "pid", id="pinned-cpu", pool="cpu"),
        ],
    )
    assert {k: v["status"] for k, v in replies.items()} == dict.fromkeys(replies, "ok")
    where = {task_id: (reply["pool"], reply["node"]) for task_id, reply in replies.items()}
    for task_id in ("train", "infer", "pinned-gpu", "asks-gpu"):
        assert where[task_id] == ("gpu", gpu_node), task_id
        # The handler sees the device Ray assigned to its actor.
        assert replies[task_id]["result"]["cuda_visible_devices"] in {"0", "1"}
    assert where["big"] == ("memory", memory_node)
    assert where["data"][0] == "cpu"
    assert where["pinned-cpu"][0] == "cpu"


async def test_gpu_work_is_unsatisfiable_without_gpu_nodes(
    daemon: Daemon, producer: RawProducer
) -> None:
    replies = await _replies(
        producer,
        [
            task("training", "echo", id="needs-gpu", resources={"gpus": 1}),
            task("training", "echo", id="pinned", pool="gpu"),
            task("training", "echo", id="huge", resources={"cpus": 512}),
            task("training", "echo", id="no-gpu-needed"),
        ],
    )
    assert replies["needs-gpu"]["error"]["code"] == "unsatisfiable"
    assert replies["pinned"]["error"]["code"] == "unsatisfiable"
    assert replies["huge"]["error"]["code"] == "unsatisfiable"
    # Training goes to the GPU pool only while one runs; here it runs on CPU.
    assert replies["no-gpu-needed"]["pool"] == "cpu"


async def test_handlers_never_see_more_concurrency_than_the_ledger_admits(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    """One actor reserving 1 CPU, tasks of 0.5 CPU: never more than two at once."""
    await start_daemon(handler_modules=["workers.diagnostics"], cpu_pool_min=1, cpu_pool_max=1)
    bodies = [
        task("data_processing", "occupancy", {"seconds": 0.1}, resources={"cpus": 0.5})
        for _ in range(12)
    ]
    replies = await _replies(producer, bodies)
    peaks = [reply["result"]["max"] for reply in replies.values()]
    assert max(peaks) == 2


async def test_priority_orders_waiting_tasks(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        handler_modules=["workers.diagnostics"], cpu_pool_min=1, cpu_pool_max=1
    )
    all_waiting = when_waiting(daemon, 6)
    gate = tmp_path / "open"
    inbox = await producer.inbox()
    # A 1-CPU blocker holds the only actor; six 1-CPU tasks then wait behind it.
    await producer.publish(
        "training",
        task("training", "wait_file", {"path": str(gate)}, id="blocker"),
        reply_to=inbox.name,
    )
    order = [("low-1", 1), ("high-1", 9), ("mid", 5), ("low-2", 1), ("high-2", 9), ("zero", 0)]
    for task_id, priority in order:
        await producer.publish(
            "training", task("training", "echo", id=task_id, priority=priority), reply_to=inbox.name
        )
    await asyncio.wait_for(all_waiting.wait(), 60)
    gate.touch()
    replies = await inbox.wait_for(7)
    assert [r.payload["id"] for r in replies] == [
        "blocker",
        "high-1",
        "high-2",
        "mid",
        "low-1",
        "low-2",
        "zero",
    ]


async def test_node_removed_mid_run_its_tasks_are_placed_again(
    nodes: Nodes, start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    first = nodes.add(num_cpus=1, num_gpus=1)
    daemon = await start_daemon(
        gpu_pool_min=1, gpu_pool_max=2, default_max_retries=3, retry_backoff_s=0.05
    )
    assert {a.node_id for a in daemon.pools.actors("gpu")} == {first}
    inbox = await producer.inbox()
    bodies = [
        task(
            "training",
            "sleep",
            {"seconds": 3},
            id=f"long-{n}",
            resources={"gpus": 0.25, "cpus": 0.25},
        )
        for n in range(4)
    ]
    started = asyncio.Event()
    forward = daemon.scheduler.ledger.place

    def place(pool: str, request: Any) -> Any:
        placed = forward(pool, request)
        if pool == "gpu" and daemon.scheduler.ledger.pool_view("gpu")["running"] == 4:
            started.set()
        return placed

    daemon.scheduler.ledger.place = place  # type: ignore[method-assign]
    for body in bodies:
        await producer.publish("training", body, reply_to=inbox.name)
    await asyncio.wait_for(started.wait(), 60)
    second = nodes.add(num_cpus=1, num_gpus=1)
    nodes.remove(first)

    await inbox.wait_for(4, timeout_s=120)
    replies = {r.payload["id"]: r.payload for r in inbox.messages}
    assert set(replies) == {b["id"] for b in bodies}
    for reply in replies.values():
        assert reply["status"] == "ok", reply
        assert reply["attempts"] == 2
        assert reply["node"] == second
    assert first not in {n.node_id for n in daemon.scheduler.ledger.alive_nodes()}
    assert all(a.node_id == second for a in daemon.pools.actors("gpu"))


async def test_a_backlog_that_cannot_be_placed_stays_in_rabbitmq(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    """Past SWARM_MAX_WAITING_PER_QUEUE waiting tasks the queue's consumer pauses: the rest
    of the backlog stays queued in RabbitMQ although the prefetch window would take it."""
    daemon = await start_daemon(
        handler_modules=["workers.diagnostics"],
        cpu_pool_min=1,
        cpu_pool_max=1,
        prefetch=200,
        max_waiting_per_queue=5,
    )
    assert daemon.ingress is not None
    queue = "swarm.tasks.training"
    one_waiting, paused = when_waiting(daemon, 1), when_waiting(daemon, 5)
    gate = tmp_path / "open"
    inbox = await producer.inbox()
    await producer.publish(
        "training", task("training", "wait_file", {"path": str(gate)}), reply_to=inbox.name
    )
    await producer.publish("training", task("training", "echo"), reply_to=inbox.name)
    await asyncio.wait_for(one_waiting.wait(), 60)  # the blocker holds the only actor
    for _ in range(60):
        await producer.publish("training", task("training", "echo"), reply_to=inbox.name)
    await asyncio.wait_for(paused.wait(), 60)
    status = await daemon.ingress.queue_depths()
    assert daemon.ingress.is_paused(queue)
    assert status[queue] >= 30, status
    gate.touch()
    await inbox.wait_for(62, timeout_s=120)
    assert all(r.payload["status"] == "ok" for r in inbox.messages)
    assert not daemon.ingress.is_paused(queue)


async def test_pool_grows_under_backlog_and_shrinks_back_when_idle(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    daemon = await start_daemon(cpu_pool_min=1, cpu_pool_max=3, pool_idle_s=0.2)
    ledger = daemon.scheduler.ledger
    sizes: list[int] = []
    back_to_min = asyncio.Event()
    add, remove = ledger.add_actor, ledger.remove_actor

    def count() -> int:
        return sum(1 for load in ledger.actors.values() if load.info.pool == "cpu")

    def on_add(info: Any) -> None:
        add(info)
        sizes.append(count())

    def on_remove(key: str) -> None:
        remove(key)
        sizes.append(count())
        if count() == 1:
            back_to_min.set()

    ledger.add_actor = on_add  # type: ignore[method-assign]
    ledger.remove_actor = on_remove  # type: ignore[method-assign]
    bodies = [task("training", "sleep", {"seconds": 0.5}) for _ in range(9)]
    replies = await _replies(producer, bodies)
    assert all(reply["status"] == "ok" for reply in replies.values())
    assert max(sizes) == 3  # grew to its maximum, never past it
    await asyncio.wait_for(back_to_min.wait(), 60)
    assert count() == 1
