"""A task message delivered more than SWARM_MAX_DELIVERIES times without reaching an outcome
is answered `redelivery_limit` and dead-lettered instead of run again; the count is RabbitMQ's
`x-delivery-count`, read only on a delivery RabbitMQ marks redelivered, so a producer's own
header changes nothing. A result too large to publish is answered `too_large` instead of
costing the connection at every try."""

import asyncio

import pytest
from processor_harness import Harness, make_harness, until
from processor_harness import delivery as make_delivery

from broker.tasks.delivery import LEASE_HEADER, Delivery
from broker.tasks.leases import LeaseSeal
from broker.tasks.outcome import Outcome
from schemas.codec import decode
from workers.outcome import RunOutcome


async def run_to_outcome(harness: Harness, delivery: Delivery) -> Outcome:
    harness.pools.release.set()
    return await asyncio.wait_for(harness.processor.process(delivery), 2.0)


async def test_a_task_redelivered_past_the_limit_is_answered_and_not_run() -> None:
    harness = make_harness(max_deliveries=10)
    worn = make_delivery("worn", redelivered=True, headers={"x-delivery-count": 10})
    outcome = await run_to_outcome(harness, worn)
    assert outcome.status == "error" and outcome.error_code == "redelivery_limit"
    assert outcome.dead_letter and outcome.recorded
    reply = decode(outcome.reply_body)
    assert reply["error"]["code"] == "redelivery_limit" and "11 times" in reply["error"]["message"]
    assert harness.pools.started == []


async def test_a_task_redelivered_up_to_the_limit_still_runs() -> None:
    harness = make_harness(max_deliveries=10)
    again = make_delivery("again", redelivered=True, headers={"x-delivery-count": 9})
    outcome = await run_to_outcome(harness, again)
    assert outcome.status == "ok" and harness.pools.started == ["again"]


@pytest.mark.parametrize("forged", [1000, 10**12, -1, "99", b"99", True, 2.5, None])
async def test_a_producers_delivery_count_on_a_first_delivery_is_ignored(forged: object) -> None:
    harness = make_harness(max_deliveries=1)
    first = make_delivery("forged", headers={"x-delivery-count": forged})
    outcome = await run_to_outcome(harness, first)
    assert outcome.status == "ok" and harness.pools.started == ["forged"]


@pytest.mark.parametrize("unreadable", ["99", b"99", True, 2.5, None, -4])
async def test_a_redelivery_without_a_readable_count_counts_as_the_second(
    unreadable: object,
) -> None:
    harness = make_harness(max_deliveries=2)
    again = make_delivery("unreadable", redelivered=True, headers={"x-delivery-count": unreadable})
    assert again.earlier_deliveries == 1
    outcome = await run_to_outcome(harness, again)
    assert outcome.status == "ok"


async def test_a_result_over_the_reply_limit_is_answered_too_large_once() -> None:
    harness = make_harness(max_reply_mb=1)
    big = b"\xc6" + (2 * 1024 * 1024).to_bytes(4, "big") + bytes(2 * 1024 * 1024)  # msgpack bin

    async def run(*_: object, **__: object) -> RunOutcome:
        harness.pools.started.append("big")
        return RunOutcome(ok=True, payload=big, run_ms=1.0)

    harness.pools.run = run  # type: ignore[method-assign]
    outcome = await asyncio.wait_for(harness.processor.process(make_delivery("big")), 2.0)
    assert outcome.status == "error" and outcome.error_code == "too_large"
    assert outcome.dead_letter and outcome.recorded and outcome.attempts == 1
    assert len(outcome.reply_body) < 4096
    assert "SWARM_MAX_REPLY_MB" in decode(outcome.reply_body)["error"]["message"]
    assert harness.pools.started == ["big"]


def test_a_renewal_copy_carries_its_tasks_deliveries_under_the_seal() -> None:
    seal = LeaseSeal(b"k")
    original = make_delivery("carry")
    value = seal.header_value(original, 2, 5)
    assert value.startswith("2:5.")
    assert seal.verified(make_delivery("carry", headers={LEASE_HEADER: value})) == (2, 5)
    # The count is sealed: changing it breaks the seal, and the copy is an ordinary task.
    forged = value.replace("2:5.", "2:0.", 1)
    assert seal.verified(make_delivery("carry", headers={LEASE_HEADER: forged})) == (0, 0)
    # A copy of a task delivered once reads as copies always did.
    once = seal.header_value(original, 3)
    assert "." in once and ":" not in once.partition(".")[0]
    assert seal.verified(make_delivery("carry", headers={LEASE_HEADER: once})) == (3, 1)


async def test_the_count_goes_on_across_renewal_copies() -> None:
    harness = make_harness(max_deliveries=10, lease_renew_s=0.01)
    seal = harness.processor.leases
    # The task's 4th delivery on its previous daemon made this copy; RabbitMQ has since
    # delivered the copy 5 times more: 9 deliveries before this one.
    body_of = make_delivery("chain")
    copy = make_delivery(
        "chain",
        redelivered=True,
        headers={LEASE_HEADER: seal.header_value(body_of, 7, 4), "x-delivery-count": 5},
    )
    running = asyncio.create_task(harness.processor.process(copy))
    await harness.pools.runs_started(1)
    await until(lambda: bool(harness.renewals))
    # Its own copy carries 10: this delivery included.
    assert harness.renewals[0].startswith("8:10.")
    harness.pools.release.set()
    await harness.answer(copy, await running)
    # Delivered once more, that copy is past the limit.
    worn = make_delivery("chain-2", redelivered=True, headers={"x-delivery-count": 1})
    worn_copy = make_delivery(
        "chain-2",
        redelivered=True,
        headers={LEASE_HEADER: seal.header_value(worn, 1, 10), "x-delivery-count": 1},
    )
    outcome = await harness.processor.process(worn_copy)
    assert outcome.error_code == "redelivery_limit"
