"""Scale from zero, as plain logic: node types read from an autoscaler config, what a pool
could ever hold, how many actors a backlog wants, the scale-up timeout, and the scheduler's
side (waiting requests, waits ended by a failed scale-up)."""

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from broker.errors import ScaleUpTimedOut
from broker.scheduling.elastic import (
    ElasticCapacity,
    ScaleUps,
    actors_wanted,
    memory_in_bundle,
    retirement_order,
    tasks_per_actor,
    unmanaged_nodes,
)
from broker.scheduling.ledger import Ledger
from broker.scheduling.scheduler import Scheduler
from workers.autoscaling import (
    AutoscalerConfigError,
    NodeType,
    bundle,
    node_types_from_config,
    read_config_file,
)
from workers.cluster import NodeInfo
from workers.pool import ActorInfo, PoolSpec
from workers.resources import ResourceVector

GPU = PoolSpec("gpu", 0, 8, ResourceVector(cpus=1.0, gpus=1.0), max_concurrency=64)
MEMORY = PoolSpec(
    "memory",
    0,
    4,
    ResourceVector(cpus=1.0, memory_mb=4096),
    custom_resources={"swarm_memory_node": 0.001},
)
CONFIG = {
    "max_workers": 5,
    "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 2}, "max_workers": 0},
        "gpu": {"resources": {"CPU": 8, "GPU": 2}, "min_workers": 0, "max_workers": 2},
        "memory": {
            "resources": {"CPU": 4, "swarm_memory_node": 1, "memory": 64 * 1024**3},
            "max_workers": 1,
        },
        "retired": {"resources": {"CPU": 64, "GPU": 8}, "max_workers": 0},
    },
}


def cpu_only_ledger() -> Ledger:
    ledger = Ledger()
    ledger.set_nodes([NodeInfo("head", True, "10.0.0.1", ResourceVector(cpus=2.0))])
    return ledger


def test_node_types_from_a_cluster_launcher_config() -> None:
    types = {t.name: t for t in node_types_from_config(CONFIG)}
    assert types["head"].max_count == 1
    assert types["gpu"].total == ResourceVector(cpus=8.0, gpus=2.0)
    assert types["gpu"].max_count == 2 and not types["gpu"].declares_memory
    assert types["memory"].total.memory_mb == 64 * 1024
    assert types["memory"].custom == {"swarm_memory_node": 1.0}
    assert types["memory"].declares_memory


def test_a_config_file_that_cannot_be_read_says_which_and_why(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(AutoscalerConfigError, match=r"absent\.yaml"):
        read_config_file(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("available_node_types: [1, 2]\n")
    with pytest.raises(AutoscalerConfigError, match="available_node_types"):
        read_config_file(broken)
    good = tmp_path / "cluster.yaml"
    good.write_text("available_node_types:\n  gpu:\n    resources: {CPU: 2, GPU: 1}\n")
    assert [t.name for t in read_config_file(good)] == ["gpu"]


def test_a_node_type_holds_an_actor_only_with_its_shape_and_marking() -> None:
    types = {t.name: t for t in node_types_from_config(CONFIG)}
    assert types["gpu"].could_host(GPU.shape, {})
    assert not types["gpu"].could_host(MEMORY.shape, MEMORY.custom_resources)  # unmarked
    assert types["memory"].could_host(MEMORY.shape, MEMORY.custom_resources)
    too_much = ResourceVector(cpus=1.0, memory_mb=128 * 1024)
    assert not types["memory"].could_host(too_much, {})  # it states its memory
    undeclared = NodeType("m", ResourceVector(cpus=4.0), {"swarm_memory_node": 1.0})
    assert undeclared.could_host(too_much, {})  # memory only known once a node starts
    assert not types["retired"].could_host(GPU.shape, {})  # max_workers 0: never launched


def test_capacity_counts_the_node_types_the_autoscaler_could_add() -> None:
    ledger = cpu_only_ledger()
    fixed = ElasticCapacity(ledger)
    elastic = ElasticCapacity(ledger, node_types_from_config(CONFIG))
    two_gpus = ResourceVector(cpus=1.0, gpus=2.0)
    assert not fixed.could_ever_fit(two_gpus) and not fixed.could_host(GPU)
    assert elastic.could_ever_fit(two_gpus) and elastic.could_host(GPU)
    assert not elastic.could_ever_fit(ResourceVector(cpus=1.0, gpus=3.0))
    assert elastic.could_host(MEMORY)
    # The retired type (8 GPUs, never launched) is not "the largest node".
    assert elastic.largest_node() == ResourceVector(cpus=8.0, gpus=2.0, memory_mb=64 * 1024)


def test_a_backlog_wants_the_actors_it_fills_up_to_the_pool_maximum() -> None:
    one_gpu = ResourceVector(cpus=0.0, gpus=1.0)
    quarter = ResourceVector(cpus=0.0, gpus=0.25)
    assert tasks_per_actor(GPU, one_gpu) == 1
    assert tasks_per_actor(GPU, quarter) == 4
    assert tasks_per_actor(GPU, ResourceVector()) == GPU.max_concurrency
    assert actors_wanted(GPU, 0, 0, Counter()) == 0  # min 0, nothing waiting
    assert actors_wanted(GPU, 0, 0, Counter({quarter: 5})) == 2
    assert actors_wanted(GPU, 0, 0, Counter({one_gpu: 3, quarter: 4})) == 4
    assert actors_wanted(GPU, 0, 0, Counter({one_gpu: 20})) == GPU.max_size
    assert actors_wanted(GPU, 6, 1, Counter({one_gpu: 20})) == 1  # 6 up, 1 starting, max 8
    at_least_two = PoolSpec("gpu", 2, 8, GPU.shape)
    assert actors_wanted(at_least_two, 0, 0, Counter()) == 2  # its minimum, with no backlog


def test_a_scale_up_times_out_unless_actors_keep_coming() -> None:
    scale_ups = ScaleUps(timeout_s=10.0)
    scale_ups.set("gpu", 3, now_s=100.0)
    scale_ups.set("gpu", 2, now_s=105.0)  # still pending: the clock runs from 100
    assert not scale_ups.timed_out("gpu", now_s=109.0)
    scale_ups.progressed("gpu", now_s=109.0)  # an actor joined
    assert not scale_ups.timed_out("gpu", now_s=118.0)
    assert scale_ups.timed_out("gpu", now_s=119.5)
    assert not scale_ups.timed_out("gpu", now_s=120.0)  # a new attempt starts
    assert scale_ups.any and scale_ups.actors("gpu") == 2
    scale_ups.set("gpu", 0, now_s=121.0)
    assert not scale_ups.any and scale_ups.waiting_since("gpu") is None
    assert not scale_ups.timed_out("gpu", now_s=1000.0)


def test_a_bundle_asks_what_the_actor_asks_of_ray() -> None:
    assert bundle(GPU.shape, {}, memory=True) == {"CPU": 1.0, "GPU": 1.0}
    assert bundle(MEMORY.shape, MEMORY.custom_resources, memory=True) == {
        "CPU": 1.0,
        "memory": 4096.0 * 1024 * 1024,
        "swarm_memory_node": 0.001,
    }
    # Node types that do not state their memory would never seem to fit a memory request.
    assert bundle(MEMORY.shape, MEMORY.custom_resources, memory=False) == {
        "CPU": 1.0,
        "swarm_memory_node": 0.001,
    }


async def test_the_scheduler_reports_waiting_requests_and_ends_waits_on_a_failed_scale_up() -> None:
    scheduler = Scheduler(cpu_only_ledger())
    one_gpu = ResourceVector(gpus=1.0)
    half = ResourceVector(gpus=0.5)
    waits = [
        asyncio.create_task(scheduler.acquire("gpu", request, 0, "swarm.tasks.training"))
        for request in (one_gpu, one_gpu, half)
    ]
    await asyncio.sleep(0)  # each acquire runs up to its wait
    assert scheduler.waiting_requests("gpu") == Counter({one_gpu: 2, half: 1})
    assert scheduler.waiting_by_tag("swarm.tasks.training") == 3
    error = ScaleUpTimedOut("gpu", 10.0)
    assert scheduler.reject_waiting("gpu", error) == 3
    for wait in waits:
        with pytest.raises(ScaleUpTimedOut, match="SWARM_SCALE_UP_TIMEOUT_S"):
            await wait
    assert scheduler.waiting("gpu") == 0
    assert scheduler.waiting_requests("gpu") == Counter()
    assert scheduler.waiting_by_tag("swarm.tasks.training") == 0
    assert scheduler.reject_waiting("gpu", error) == 0


def test_a_bundle_asks_for_memory_where_a_type_stating_it_could_hold_the_actor() -> None:
    types = node_types_from_config(CONFIG)
    assert memory_in_bundle(MEMORY, types)  # the memory type states 64 GiB
    gpu_with_memory = PoolSpec("gpu", 0, 8, ResourceVector(cpus=1.0, gpus=1.0, memory_mb=2048))
    assert not memory_in_bundle(gpu_with_memory, types)  # the GPU type states none
    assert not memory_in_bundle(GPU, types)  # asks for no memory at all


def test_nodes_of_no_known_type_are_unmanaged_where_every_type_states_its_resources() -> None:
    types = node_types_from_config(CONFIG)
    head = NodeInfo("h", True, "10.0.0.1", ResourceVector(cpus=2.0))
    memory = NodeInfo(
        "m", True, "10.0.0.2", ResourceVector(cpus=4.0, memory_mb=65000), {"swarm_memory_node": 1.0}
    )
    static = NodeInfo("s", True, "10.0.0.3", ResourceVector(cpus=32.0))
    assert unmanaged_nodes([head, memory, static], types) == {"s"}
    # A type with `resources: {}` takes them from its node: any node could be of it.
    detected = [*types, NodeType("auto", ResourceVector())]
    assert unmanaged_nodes([head, memory, static], detected) == set()


def test_idle_actors_on_added_nodes_retire_first_emptying_the_emptiest_node_first() -> None:
    def actor(key: str, node: str) -> ActorInfo:
        return ActorInfo(key, "cpu", node, ResourceVector(cpus=1.0), 4)

    idle = [actor("a", "head"), actor("b", "gpu-1"), actor("c", "head"), actor("d", "gpu-2")]
    actors_on = {"head": 2, "gpu-1": 3, "gpu-2": 1}
    order = retirement_order(idle, {"gpu-1", "gpu-2"}, actors_on)
    assert [info.key for info in order] == ["d", "b", "c", "a"]
