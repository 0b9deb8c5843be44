"""Pools that scale from zero on Ray's real autoscaler (its fake multi-node provider, logical
GPUs): tasks for a pool with no node make the autoscaler add one, run there, and once the pool
is idle again the node goes. The daemon joins the cluster with RAY_ADDRESS, as in production.
"""

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import until
from daemon_process import DaemonProcess
from raw import RawProducer, task
from ray_autoscaler import AUTH, MEMORY_MARK, AutoscalingCluster, start_autoscaling_cluster

from broker.producer.client import SwarmClient
from schemas.reply import Reply

NODE_TYPES: dict[str, dict[str, Any]] = {
    "cpu": {"resources": {"CPU": 2}, "max_workers": 2},
    "gpu": {"resources": {"CPU": 2, "GPU": 2}, "max_workers": 2},
    "memory": {"resources": {"CPU": 2, MEMORY_MARK: 1}, "max_workers": 1},
}

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AutoscalingCluster]:
    cluster = start_autoscaling_cluster(tmp_path_factory.mktemp("autoscaler"), NODE_TYPES)
    try:
        yield cluster
    finally:
        cluster.stop()


def _elastic_daemon(amqp_url: str, cluster: AutoscalingCluster, **settings: Any) -> DaemonProcess:
    """A daemon joined to the autoscaling cluster, its GPU and memory pools from zero."""
    defaults: dict[str, Any] = {
        "autoscaler_config": cluster.config_path,
        "gpu_pool_min": 0,
        "memory_pool_min": 0,
        "pool_idle_s": 1,
        "scale_up_timeout_s": 300,
        "metrics_port": -1,
    }
    daemon = DaemonProcess(amqp_url, cluster.address, **{**defaults, **settings})
    daemon.env.update(AUTH)
    return daemon


def _alive(status: dict[str, Any], has: str) -> set[str]:
    """Ids of the alive nodes that have the resource `has` (gpus, or a custom one)."""
    found = set()
    for node in status["nodes"]:
        amount = node["total"].get(has, node["custom"].get(has, 0))
        if node["alive"] and amount:
            found.add(node["node_id"])
    return found


def _sleep_tasks(
    client: SwarmClient, task_type: str, resources: dict[str, float]
) -> Callable[[int], Awaitable[Reply]]:
    """Submits task `n` of a batch: a short sleep asking `resources`, its id from its pool."""

    async def submit(n: int) -> Reply:
        return await client.submit(
            task_type,
            "sleep",
            {"seconds": 0.2},
            task_id=f"{task_type}-{n}",
            resources=resources,
        )

    return submit


async def _scale_from_zero(
    client: SwarmClient,
    daemon: DaemonProcess,
    pool: str,
    marker: str,
    submit: Callable[[int], Awaitable[Reply]],
    tasks: int,
) -> dict[str, float]:
    """Send `tasks` tasks to a pool with no actor and no node; check each ran on a node the
    autoscaler added for it, and that the node goes once the pool is idle. The figures."""
    before = await client.status()
    assert before["pools"][pool]["actors"] == 0
    assert not _alive(before, marker), f"a {pool} node is up before any {pool} task"

    sent = time.monotonic()
    replies: list[Reply] = list(await asyncio.gather(*(submit(n) for n in range(tasks))))
    answered_s = time.monotonic() - sent
    during = await client.status()
    added = _alive(during, marker)
    assert added, f"the autoscaler added no {pool} node"
    assert [r.status for r in replies] == ["ok"] * tasks, [r.error for r in replies]
    assert {r.pool for r in replies} == {pool}
    assert {r.node for r in replies} <= added, "a task ran off the nodes added for its pool"

    # Idle actors retire to the pool's minimum (0), the request is withdrawn, and the
    # autoscaler removes the idle node.
    idle = time.monotonic()
    await daemon.logged("scale_up_withdrawn", timeout_s=120)

    async def node_gone() -> bool:
        return not _alive(await client.status(), marker)

    await until(node_gone, f"the idle {pool} node removed", timeout_s=180)
    return {
        "nodes_added": len(added),
        "answered_s": round(answered_s, 1),
        "removed_after_idle_s": round(time.monotonic() - idle, 1),
    }


async def test_gpu_tasks_bring_a_gpu_node_up_and_it_goes_when_idle(
    autoscaling_cluster: AutoscalingCluster, amqp_url: str
) -> None:
    daemon = await _elastic_daemon(amqp_url, autoscaling_cluster).start()
    try:
        started = [e for e in daemon.log if e.get("event") == "pool_started"]
        assert {e["pool"]: e["scales_from_zero"] for e in started} == {
            "cpu": False,
            "gpu": True,
            "memory": True,
        }
        async with SwarmClient(amqp_url, reply_timeout_s=300) as client:
            # No node type has 3 GPUs: unsatisfiable at once, nothing asked of the autoscaler.
            too_big = await client.submit(
                "training", "echo", {}, task_id="gpu-too-big", resources={"gpus": 3}
            )
            assert too_big.error is not None and too_big.error.code == "unsatisfiable"
            # It never waited, so the GPU pool has nothing pending for a sizing pass to ask
            # for, and no request was sent.
            gpu = (await client.status())["pools"]["gpu"]
            assert (gpu["waiting"], gpu["scale_up_actors"]) == (0, 0)
            requested = [e for e in daemon.log if e.get("event") == "scale_up_requested"]
            assert not requested, "the autoscaler was asked for room for a task no node fits"

            gpu_tasks = _sleep_tasks(client, "training", {"gpus": 1})
            figures = await _scale_from_zero(client, daemon, "gpu", "gpus", gpu_tasks, 20)
    finally:
        daemon.terminate()
        assert await daemon.wait() == 0
    print(f"gpu scale from zero: {json.dumps(figures)}")


async def test_memory_tasks_bring_a_memory_node_up_and_it_goes_when_idle(
    autoscaling_cluster: AutoscalingCluster, amqp_url: str
) -> None:
    daemon = await _elastic_daemon(amqp_url, autoscaling_cluster).start()
    try:
        async with SwarmClient(amqp_url, reply_timeout_s=300) as client:
            memory_tasks = _sleep_tasks(client, "data_processing", {"memory_mb": 3000})
            figures = await _scale_from_zero(client, daemon, "memory", MEMORY_MARK, memory_tasks, 8)
    finally:
        daemon.terminate()
        assert await daemon.wait() == 0
    print(f"memory scale from zero: {json.dumps(figures)}")


async def test_a_scale_up_that_never_comes_is_answered_unsatisfiable_and_dead_lettered(
    autoscaling_cluster: AutoscalingCluster, amqp_url: str, producer: RawProducer, tmp_path: Path
) -> None:
    # The daemon is told of a node type with 4 GPUs that the autoscaler cannot launch (its
    # GPU nodes have 2): the request is never met, and the timeout ends the wait.
    config = json.loads(autoscaling_cluster.config_path.read_text())
    config["available_node_types"]["gpu"]["resources"]["GPU"] = 4
    believed = tmp_path / "believed.json"
    believed.write_text(json.dumps(config))
    daemon = await _elastic_daemon(
        amqp_url,
        autoscaling_cluster,
        autoscaler_config=believed,
        gpu_actor_gpus=4,
        scale_up_timeout_s=10,
    ).start()
    try:
        dead = await producer.watch_dead()
        inbox = await producer.inbox("never-replies")
        await producer.publish(
            "training",
            task("training", "echo", {}, id="never", resources={"gpus": 4}),
            reply_to=inbox.name,
        )
        await daemon.logged("scale_up_requested")
        async with SwarmClient(amqp_url) as client:
            pending = (await client.status())["pools"]["gpu"]
        assert (pending["actors"], pending["waiting"], pending["scale_up_actors"]) == (0, 1, 1)
        reply = (await inbox.one(timeout_s=120)).payload
        assert reply["status"] == "error"
        assert reply["error"]["code"] == "unsatisfiable"
        assert "SWARM_SCALE_UP_TIMEOUT_S" in reply["error"]["message"]
        letter = await dead.one(timeout_s=60)
        assert letter.payload["id"] == "never"
        await daemon.logged("scale_up_timed_out")
        await daemon.logged("scale_up_withdrawn")
    finally:
        daemon.terminate()
        assert await daemon.wait() == 0
