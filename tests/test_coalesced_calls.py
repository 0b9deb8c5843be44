"""Coalesced runs on a real Ray actor: one call carries many runs, each gets its own result."""

import asyncio
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from ray.cluster_utils import Cluster

from workers.actor import WorkerActor
from workers.coalescing import CallCoalescer

RUNS = 200


def start_actor(handler_modules: list[str]) -> Iterator[Any]:
    import ray

    handle = (
        ray.remote(WorkerActor).options(num_cpus=0.1, max_restarts=0).remote("cpu", handler_modules)
    )
    ray.get(handle.describe.remote())
    yield handle
    ray.kill(handle, no_restart=True)


@pytest.fixture
def actor(ray_cluster: Cluster) -> Iterator[Any]:
    yield from start_actor(["workers.builtin"])


async def test_many_runs_travel_in_few_calls_each_with_its_own_result(actor: Any) -> None:
    coalescer = CallCoalescer(actor)
    waiters = [coalescer.submit(("echo", "inference", {"n": n}, None)) for n in range(RUNS)]
    outcomes = await asyncio.gather(*waiters)
    assert [msgpack.unpackb(o.payload) for o in outcomes] == [{"n": n} for n in range(RUNS)]
    assert all(o.ok for o in outcomes)
    print(f"runs={RUNS} ray calls={coalescer.calls_sent}")
    assert coalescer.calls_sent < RUNS / 10


async def test_a_killed_actor_fails_every_queued_run(actor: Any) -> None:
    import ray
    import ray.exceptions

    ray.kill(actor, no_restart=True)
    # ray.kill is asynchronous: calls sent before the kill lands still run. A call that fails
    # is the event that says the actor is gone; every call after it must fail too.
    await wait_until_dead(actor)
    coalescer = CallCoalescer(actor)
    waiters = [coalescer.submit(("echo", "inference", n, None)) for n in range(5)]
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, ray.exceptions.RayActorError) for r in results), results


async def wait_until_dead(actor: Any) -> None:
    import ray.exceptions

    while True:
        try:
            await actor.describe.remote()
        except ray.exceptions.RayActorError:
            return


@pytest.fixture
def diagnostics_actor(ray_cluster: Cluster) -> Iterator[Any]:
    yield from start_actor(["workers.diagnostics"])


async def test_a_batch_handlers_runs_in_one_call_become_one_batch(diagnostics_actor: Any) -> None:
    coalescer = CallCoalescer(diagnostics_actor)
    waiters = [coalescer.submit(("batch_echo", "inference", n, None)) for n in range(16)]
    outcomes = await asyncio.gather(*waiters)
    results = [msgpack.unpackb(o.payload) for o in outcomes]
    assert [r["item"] for r in results] == list(range(16))
    assert {r["batch"] for r in results} == {16}, "all 16 ran as one batch"
    assert coalescer.calls_sent == 1
