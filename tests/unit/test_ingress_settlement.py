"""broker.amqp.ingress: when a delivery is acked and when it goes back to its queue (Ingress._handle
and AmqpSettlement), draining at shutdown, and consumers paused across a reconnect. The real
Ingress, AmqpSession and Publisher on RabbitMQ in memory (tests/unit/fakes), no Ray."""

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from fakes.server import MemoryBroker, Message, nack
from fakes.swarm import MemorySwarm, quick_settings, task_body

from broker.amqp.incoming import AmqpSettlement
from broker.amqp.outcomes import OUTCOMES_QUEUE
from broker.tasks.delivery import Delivery
from broker.tasks.outcome import Outcome
from schemas.topology import CONTROL_QUEUE, TASK_TYPES, task_queue

QUEUE = task_queue("data_processing")


@pytest.fixture
async def make_swarm(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Callable[..., MemorySwarm]]:
    """MemorySwarms for one test, each closed at its end (see MemorySwarm.close)."""
    made: list[MemorySwarm] = []

    def make(**options: Any) -> MemorySwarm:
        made.append(MemorySwarm(monkeypatch, **options))
        return made[-1]

    yield make
    for swarm in made:
        await swarm.close()


@pytest.fixture
async def swarm(make_swarm: Callable[..., MemorySwarm]) -> MemorySwarm:
    started = make_swarm()
    await started.start()
    return started


# == Requeue when there is no outcome to publish ===============================================


async def test_a_delivery_whose_processing_raises_goes_back_to_its_queue_unanswered(
    swarm: MemorySwarm,
) -> None:
    async def broken(delivery: Delivery) -> Outcome:
        raise RuntimeError("a bug in processing")

    swarm.process_task = broken
    message = swarm.send(task_body("t"))
    await swarm.settled(message)

    assert message.history == ["delivered", "requeued"]
    assert message.redelivered
    assert swarm.replies() == [] and swarm.dead_letters() == [] and swarm.broker.stream == []
    assert swarm.outcomes == []  # nothing settled: nothing to release


async def test_an_outcome_whose_record_is_refused_is_requeued_and_run_again(
    swarm: MemorySwarm,
) -> None:
    swarm.broker.on_publish(nack, routing_key=OUTCOMES_QUEUE, times=1)
    message = swarm.send(task_body("t"))
    (await swarm.pools.next_call()).succeed("first")
    await swarm.settled(message)

    assert message.history == ["delivered", "requeued"]
    assert swarm.store.get("t") is None  # not stored: a redelivery must run it again
    assert swarm.processor.active.count == 0  # duplicates waiting on it were let go
    # The reply went out with the record, in parallel: the producer may get it twice.
    assert [r["result"] for r in swarm.replies()] == ["first"]

    swarm.broker.queue(QUEUE).dispatch()  # RabbitMQ redelivers it
    (await swarm.pools.next_call()).succeed("second")
    await swarm.until(lambda: message.acked, "the redelivery to be acked")
    assert [r["result"] for r in swarm.replies()] == ["first", "second"]
    stored = swarm.store.get("t")
    assert stored is not None and stored.status == "ok"


@pytest.mark.parametrize("settle", ["ack", "requeue"])
async def test_a_settlement_on_a_channel_that_closed_does_not_raise(settle: str) -> None:
    broker = MemoryBroker(queues=[QUEUE])
    session = await broker.open_session()
    queue = await session.consume_channel.get_queue(QUEUE, ensure=False)
    received: list[object] = []

    async def take(message: object) -> None:
        received.append(message)
        broker.changes.notify()

    await queue.consume(take)
    broker.queue(QUEUE).put(Message(b"body", {}))
    await broker.changes.until(lambda: bool(received), "the delivery")
    settlement = AmqpSettlement(received[0], session.acks)  # type: ignore[arg-type]
    broker.connection.lose()

    await (settlement.ack() if settle == "ack" else settlement.requeue())
    # RabbitMQ requeued it when the channel closed; the settlement changed nothing.
    assert broker.queue(QUEUE).delivered[0].history == ["delivered", "returned"]


# == Draining at shutdown =======================================================================


async def test_a_drain_that_times_out_requeues_only_the_deliveries_still_running(
    swarm: MemorySwarm,
) -> None:
    done = swarm.send(task_body("done"))
    stuck = swarm.send(task_body("stuck"))
    calls = {}
    for _ in range(2):
        call = await swarm.pools.next_call()
        calls[call.task_id] = call
    calls["done"].succeed()
    await swarm.settled(done)

    await swarm.ingress.stop_consuming()
    assert await swarm.ingress.drain(0.01) == 1

    assert done.history == ["delivered", "acked"]
    assert stuck.history == ["delivered", "requeued"]
    assert calls["stuck"].cancelled
    assert [r["id"] for r in swarm.replies()] == ["done"]
    assert swarm.processor.active.count == 0
    assert all(load.running == 0 for load in swarm.scheduler.ledger.actors.values())
    await swarm.ingress.close()


async def test_a_drain_waits_for_deliveries_that_finish_within_its_timeout(
    swarm: MemorySwarm,
) -> None:
    message = swarm.send(task_body("t"))
    call = await swarm.pools.next_call()
    await swarm.ingress.stop_consuming()
    draining = asyncio.create_task(swarm.ingress.drain(30.0))
    call.succeed()

    assert await asyncio.wait_for(draining, 5.0) == 0
    assert message.history == ["delivered", "acked"]
    await swarm.ingress.close()


# == Paused consumers across a reconnect ========================================================


def consumed_on(broker: MemoryBroker, queue: str, connection: int) -> bool:
    consumers = broker.queue(queue).consumers.values()
    return any(channel.connection.number == connection for _, channel in consumers)


async def reconnected(swarm: MemorySwarm) -> None:
    """Until the second session consumes the control queue (consumed last of all)."""
    await swarm.until(
        lambda: len(swarm.broker.connections) == 2 and consumed_on(swarm.broker, CONTROL_QUEUE, 2),
        "the ingress to reconnect",
    )
    await swarm.ingress.consumers_settled()


async def test_a_consumer_paused_for_waiting_tasks_stays_paused_across_a_reconnect(
    make_swarm: Callable[..., MemorySwarm],
) -> None:
    swarm = make_swarm(settings=quick_settings(max_waiting_per_queue=4))
    await swarm.start()
    swarm.ingress.on_waiting(QUEUE, 4)  # the scheduler: four of its tasks wait for room
    await swarm.ingress.consumers_settled()
    assert swarm.ingress.is_paused(QUEUE) and not swarm.broker.queue(QUEUE).consumers

    swarm.broker.connection.lose()
    await reconnected(swarm)
    assert swarm.ingress.is_paused(QUEUE)
    assert not swarm.broker.queue(QUEUE).consumers
    for other in TASK_TYPES:
        if task_queue(other) != QUEUE:
            assert consumed_on(swarm.broker, task_queue(other), 2)
    message = swarm.send(task_body("t"))
    assert message.history == []  # left in RabbitMQ while paused

    swarm.ingress.on_waiting(QUEUE, 2)  # half of them placed: resume, on the new session
    (await swarm.pools.next_call()).succeed()
    await swarm.settled(message)
    assert message.acked and consumed_on(swarm.broker, QUEUE, 2)


async def test_held_bytes_keep_consumers_paused_across_a_reconnect_and_the_task_is_answered_once(
    make_swarm: Callable[..., MemorySwarm],
) -> None:
    swarm = make_swarm(max_held_bytes=200)
    await swarm.start()
    message = swarm.send(task_body("t", args={"pad": "x" * 200}))
    call = await swarm.pools.next_call()
    await swarm.ingress.consumers_settled()
    assert all(swarm.ingress.is_paused(task_queue(t)) for t in TASK_TYPES)

    swarm.broker.connection.lose()  # RabbitMQ requeues the delivery; the run goes on here
    await reconnected(swarm)
    assert all(not swarm.broker.queue(task_queue(t)).consumers for t in TASK_TYPES)
    assert message.history == ["delivered", "returned"]

    call.succeed("once")  # published on the new session; the old delivery's ack is moot
    await swarm.until(lambda: message.acked, "the redelivery to be acked")
    assert message.history == ["delivered", "returned", "delivered", "acked"]
    # The redelivery was answered from the outcome store: no second run, no second reply.
    assert len(swarm.pools.calls) == 1
    assert [r["result"] for r in swarm.replies()] == ["once"]
    await swarm.ingress.consumers_settled()
    assert all(consumed_on(swarm.broker, task_queue(t), 2) for t in TASK_TYPES)
