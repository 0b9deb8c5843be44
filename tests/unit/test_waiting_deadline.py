"""A task waiting for room is answered `expired` when its deadline passes, not when room
frees up: the scheduler ends the wait at the deadline and forgets the waiter."""

import asyncio
import time

import pytest
from processor_harness import delivery as make_delivery
from processor_harness import make_harness

from broker.errors import DeadlinePassed
from broker.scheduling.ledger import Ledger
from broker.scheduling.scheduler import Scheduler
from workers.cluster import NodeInfo
from workers.pool import ActorInfo
from workers.resources import ResourceVector

WHOLE_ACTOR = {"cpus": 4.0}  # the harness's one actor reserves 4 CPUs


async def test_a_waiting_task_is_answered_expired_at_its_deadline() -> None:
    harness = make_harness()
    processor, pools = harness.processor, harness.pools
    first = make_delivery("busy", resources=WHOLE_ACTOR)
    running = asyncio.create_task(processor.process(first))
    await pools.runs_started(1)
    late = make_delivery("late", resources=WHOLE_ACTOR, deadline=time.time() + 0.1)
    started = time.monotonic()
    outcome = await asyncio.wait_for(processor.process(late), 2.0)
    assert outcome.status == "expired" and outcome.error_code == "expired"
    assert time.monotonic() - started < 1.0
    assert pools.started == ["busy"]
    assert harness.scheduler.waiting("cpu") == 0
    pools.release.set()
    await harness.answer(first, await running)


async def test_the_scheduler_forgets_a_waiter_whose_deadline_passed() -> None:
    ledger = Ledger()
    ledger.set_nodes([NodeInfo("n1", True, "10.0.0.1", ResourceVector(8.0, 0.0, 0))])
    actor = ActorInfo("cpu-0", "cpu", "n1", ResourceVector(cpus=1.0), 1)
    ledger.add_actor(actor)
    scheduler = Scheduler(ledger)
    counts: list[int] = []
    scheduler.on_tag_waiting = lambda tag, count: counts.append(count)
    request = ResourceVector(cpus=1.0)
    taken = await scheduler.acquire("cpu", request, 0)
    with pytest.raises(DeadlinePassed):
        await scheduler.acquire("cpu", request, 0, "q", deadline_s=time.time() + 0.05)
    assert scheduler.waiting("cpu") == 0 and counts == [1, 0]
    # The room it would have taken goes to the next waiter.
    after = asyncio.create_task(scheduler.acquire("cpu", request, 0, deadline_s=time.time() + 5))
    await asyncio.sleep(0)
    scheduler.release("cpu", taken, request)
    assert await asyncio.wait_for(after, 1.0) == actor
