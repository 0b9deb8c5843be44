"""One run per task id at a time, however many deliveries of it wait: TaskProcessor re-checks
after waking, and ActiveTasks ends the entry that began, not whatever holds the id now."""

import asyncio

from processor_harness import delivery as make_delivery
from processor_harness import make_harness

from broker.tasks.active import ActiveTasks


async def test_two_waiters_woken_by_an_unstored_outcome_run_the_task_one_at_a_time() -> None:
    harness = make_harness()
    processor, pools = harness.processor, harness.pools
    first = make_delivery("dup-1")
    running = asyncio.create_task(processor.process(first))
    await pools.runs_started(1)
    # Two more deliveries of the id (a producer's republished duplicates) wait on that run.
    second, third = make_delivery("dup-1"), make_delivery("dup-1")
    waiting = [asyncio.create_task(processor.process(d)) for d in (second, third)]
    await asyncio.sleep(0.01)
    assert not any(task.done() for task in waiting)

    # The run ends, but its outcome could not be published: nothing is stored, so a waiter
    # must run the task again, but only one of them at a time.
    pools.release.set()
    outcome = await running
    pools.release.clear()
    await harness.answer(first, outcome, stored=False)
    await pools.runs_started(2)
    await asyncio.sleep(0.01)  # room for a second run to start, were it allowed to
    assert pools.most_at_once["dup-1"] == 1, "two deliveries ran the same task at once"
    assert pools.started == ["dup-1", "dup-1"]

    # The second run ends with a stored outcome: the last waiter is answered from it.
    pools.release.set()
    done, pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    runner = done.pop()
    ran = second if runner is waiting[0] else third
    await harness.answer(ran, runner.result())
    duplicate = await pending.pop()
    assert duplicate.reply and not duplicate.record and duplicate.status == "ok"
    assert pools.started == ["dup-1", "dup-1"]
    assert processor.active.count == 0


async def test_a_cancel_reaches_the_run_in_progress_after_an_earlier_run_ended() -> None:
    harness = make_harness()
    processor, pools = harness.processor, harness.pools
    first = make_delivery("dup-2")
    running = asyncio.create_task(processor.process(first))
    await pools.runs_started(1)
    waiters = [make_delivery("dup-2"), make_delivery("dup-2")]
    waiting = [asyncio.create_task(processor.process(d)) for d in waiters]
    await asyncio.sleep(0.01)
    pools.release.set()
    outcome = await running
    pools.release.clear()
    await harness.answer(first, outcome, stored=False)
    await pools.runs_started(2)
    await asyncio.sleep(0.01)
    # The id has one entry, and it is the run in progress: a cancel stops that run.
    assert processor.active.cancel("dup-2") == "running"
    done, pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    runner = done.pop()
    cancelled = runner.result()
    assert cancelled.status == "cancelled" and cancelled.record
    await harness.answer(waiters[waiting.index(runner)], cancelled)
    # The other delivery gets the stored outcome; the task ran twice in all, never at once.
    duplicate = await pending.pop()
    assert duplicate.status == "cancelled" and not duplicate.record
    assert pools.started == ["dup-2", "dup-2"] and pools.most_at_once["dup-2"] == 1
    assert processor.active.count == 0


async def test_ending_an_entry_leaves_a_later_entry_of_the_same_id_in_place() -> None:
    active = ActiveTasks()
    earlier = active.begin("same-id")
    active.end(earlier)
    later = active.begin("same-id")
    active.end(earlier)  # late: a second settle of the earlier run's outcome
    assert active.get("same-id") is later
    assert not later.settled.done()
    active.end(later)
    assert active.get("same-id") is None and later.settled.done()
