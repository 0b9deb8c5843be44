"""The lease keeper of a long task: what a renewal raises is logged and the renewal goes on; a
redelivery of the task's own message while it runs here is held and settled like a renewal
copy, not left unacknowledged until the task ends."""

import asyncio

from processor_harness import RecordingSettlement, make_harness, until
from processor_harness import delivery as make_delivery
from structlog.testing import capture_logs

from broker.tasks.settlement import SettleState


async def test_an_ack_that_raises_at_a_renewal_does_not_stop_the_renewals() -> None:
    harness = make_harness(lease_renew_s=0.02)
    processor, pools = harness.processor, harness.pools
    original = RecordingSettlement(fail_ack=RuntimeError("channel closed"))
    first = make_delivery("lease-1", settlement=original)
    with capture_logs() as logs:
        running = asyncio.create_task(processor.process(first))
        await pools.runs_started(1)
        await until(lambda: len(harness.renewals) >= 3)
    assert original.sent == ["ack"]  # acked once, at the first renewal, which raised
    assert any(entry["event"] == "lease_settle_failed" for entry in logs)
    pools.release.set()
    await harness.answer(first, await running)
    assert original.sent == ["ack"]  # the task's end sends nothing more: the copy carries it


async def test_a_keeper_that_ends_anyway_is_logged() -> None:
    harness = make_harness(lease_renew_s=0.01)
    processor, pools = harness.processor, harness.pools

    async def broken_keeper(*_: object) -> None:
        raise RuntimeError("keeper bug")

    processor._keep_lease = broken_keeper  # type: ignore[method-assign]
    first = make_delivery("lease-2")
    with capture_logs() as logs:
        running = asyncio.create_task(processor.process(first))
        await pools.runs_started(1)
        await until(lambda: any(e["event"] == "lease_keeper_stopped" for e in logs))
    pools.release.set()
    await harness.answer(first, await running)


async def test_a_redelivery_of_a_running_task_is_held_and_acked_with_its_outcome() -> None:
    harness = make_harness()
    processor, pools = harness.processor, harness.pools
    first = make_delivery("lease-3")
    running = asyncio.create_task(processor.process(first))
    await pools.runs_started(1)
    # The channel it came on closed; RabbitMQ delivers the same message again, lease 0.
    again = make_delivery("lease-3", redelivered=True)
    outcome = await asyncio.wait_for(processor.process(again), 1.0)
    assert not outcome.settle and not outcome.reply and not outcome.record
    token = again.settle_token
    assert isinstance(token, RecordingSettlement)
    assert token.state is SettleState.HELD and token.sent == []
    pools.release.set()
    await harness.answer(first, await running)
    await until(lambda: token.sent == ["ack"])
    assert pools.started == ["lease-3"]


async def test_a_held_redelivery_is_acked_at_the_second_renewal_and_never_twice() -> None:
    harness = make_harness(lease_renew_s=0.05)
    processor, pools = harness.processor, harness.pools
    first = make_delivery("lease-4")
    running = asyncio.create_task(processor.process(first))
    await pools.runs_started(1)
    again = make_delivery("lease-4", redelivered=True)
    await processor.process(again)
    token = again.settle_token
    assert isinstance(token, RecordingSettlement)
    # First renewal: the copy is queued, the original acked; the redelivery is held until
    # the next renewal, whose copy makes it redundant too.
    await until(lambda: token.sent == ["ack"])
    assert len(harness.renewals) >= 2
    pools.release.set()
    await harness.answer(first, await running)
    await asyncio.sleep(0.01)
    assert token.sent == ["ack"]
    original = first.settle_token
    assert isinstance(original, RecordingSettlement) and original.sent == ["ack"]
    assert original.state is SettleState.ACKED


async def test_a_held_redelivery_goes_back_to_the_queue_when_the_outcome_is_not_stored() -> None:
    harness = make_harness()
    processor, pools = harness.processor, harness.pools
    first = make_delivery("lease-5")
    running = asyncio.create_task(processor.process(first))
    await pools.runs_started(1)
    again = make_delivery("lease-5", redelivered=True)
    await processor.process(again)
    pools.release.set()
    await harness.answer(first, await running, stored=False)
    token = again.settle_token
    assert isinstance(token, RecordingSettlement)
    await until(lambda: token.sent == ["requeue"])
