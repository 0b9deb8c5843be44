"""The hot path's own publishing (broker/amqp/pipelined.py) against the real RabbitMQ: a loop turn's
publishes in one write, every confirm settled (also `multiple=True` ones), bodies past
frame_max, returns, nacks, and a channel RabbitMQ closes under pending confirms."""

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import aiormq
import pytest
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from broker.amqp.acks import Acks
from broker.amqp.deliveries import Deliveries
from broker.amqp.pipelined import PipelinedChannel
from broker.amqp.turn_writer import TurnWriter

QUEUE = "pipelined.test"


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(amqp_url)
    try:
        yield connection
    finally:
        await connection.close()


async def pipelined_on(
    connection: aio_pika.abc.AbstractConnection,
) -> tuple[PipelinedChannel, TurnWriter, aiormq.abc.AbstractChannel]:
    channel = await connection.channel(publisher_confirms=True)
    underlay = await channel.get_underlay_channel()
    writer = TurnWriter(underlay.write_queue)
    return PipelinedChannel(underlay, writer), writer, underlay


def properties(**kwargs: object) -> aiormq.spec.Basic.Properties:
    return aiormq.spec.Basic.Properties(delivery_mode=2, **kwargs)


async def test_a_turns_publishes_are_one_write_and_each_is_confirmed_in_order(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    declaring = await connection.channel()
    queue = await declaring.declare_queue(QUEUE)
    pipelined, writer, _ = await pipelined_on(connection)
    before = writer.writes
    confirms = [
        pipelined.publish(
            str(n).encode(),
            exchange="",
            routing_key=QUEUE,
            properties=properties(correlation_id=str(n)),
            mandatory=True,
        )
        for n in range(500)
    ]
    results = await asyncio.gather(*confirms)
    assert all(isinstance(result, spec.Basic.Ack) for result in results)
    assert writer.writes - before == 1
    got = []
    async with queue.iterator() as messages:
        async for message in messages:
            got.append(message.body)
            await message.ack()
            if len(got) == 500:
                break
    assert got == [str(n).encode() for n in range(500)]


async def test_a_body_past_frame_max_arrives_whole(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    declaring = await connection.channel()
    queue = await declaring.declare_queue(QUEUE)
    pipelined, _, _ = await pipelined_on(connection)
    body = bytes(range(256)) * (3 * pipelined.frame_max // 256 + 7)
    confirm = pipelined.publish(
        body, exchange="", routing_key=QUEUE, properties=properties(), mandatory=False
    )
    assert isinstance(await confirm, spec.Basic.Ack)
    message = await queue.get(timeout=10)
    assert message is not None and message.body == body


async def test_an_unroutable_mandatory_publish_is_returned_and_others_still_confirm(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    declaring = await connection.channel()
    await declaring.declare_queue(QUEUE)
    pipelined, _, _ = await pipelined_on(connection)
    lost = pipelined.publish(
        b"x", exchange="", routing_key="no.such.queue", properties=properties(), mandatory=True
    )
    kept = pipelined.publish(
        b"y", exchange="", routing_key=QUEUE, properties=properties(), mandatory=True
    )
    returned, confirmed = await asyncio.gather(lost, kept)
    assert isinstance(returned, DeliveredMessage) and returned.body == b"x"
    assert isinstance(confirmed, spec.Basic.Ack)


async def test_a_refused_publish_is_a_delivery_error_with_its_nack(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    declaring = await connection.channel()
    await declaring.declare_queue(
        QUEUE, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    pipelined, _, _ = await pipelined_on(connection)
    first, second = (
        pipelined.publish(
            body, exchange="", routing_key=QUEUE, properties=properties(), mandatory=False
        )
        for body in (b"1", b"2")
    )
    assert isinstance(await first, spec.Basic.Ack)
    with pytest.raises(aiormq.exceptions.DeliveryError) as refused:
        await second
    assert isinstance(refused.value.frame, spec.Basic.Nack)


async def test_a_channel_closed_by_rabbitmq_fails_its_pending_confirms_and_later_publishes(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    pipelined, _, underlay = await pipelined_on(connection)
    # A publish to an exchange that does not exist: RabbitMQ closes the channel (404).
    pending = [
        pipelined.publish(
            b"x", exchange=name, routing_key="", properties=properties(), mandatory=False
        )
        for name in ("amq.direct", "no.such.exchange", "amq.direct")
    ]
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 30)
    assert any(isinstance(result, BaseException) for result in results)
    assert all(
        isinstance(result, (spec.Basic.Ack, aiormq.exceptions.AMQPError, asyncio.CancelledError))
        for result in results
    ), results
    assert underlay.is_closed
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        pipelined.publish(
            b"x", exchange="", routing_key=QUEUE, properties=properties(), mandatory=False
        )


async def test_acks_of_consumed_deliveries_settle_them_all(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    """Deliveries acked out of order through `Acks` (some by a multiple ack, some alone,
    one requeued) leave nothing unacked on the channel and the requeued one in the queue."""
    declaring = await connection.channel()
    queue = await declaring.declare_queue(QUEUE)
    for n in range(20):
        await declaring.default_exchange.publish(aio_pika.Message(str(n).encode()), QUEUE)
    consuming = await connection.channel()
    await consuming.set_qos(prefetch_count=50)
    underlay = await consuming.get_underlay_channel()
    acks = Acks(underlay, TurnWriter(underlay.write_queue))
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    all_in = asyncio.Event()

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert message.delivery_tag is not None
        acks.delivered(message.delivery_tag)
        got.append(message)
        if len(got) == 20:
            all_in.set()

    consumer_tag = await (await consuming.get_queue(QUEUE)).consume(take)
    await asyncio.wait_for(all_in.wait(), 30)
    for message in reversed(got[5:]):
        if message.body == b"7":
            acks.requeue(message)
        else:
            acks.ack(message)
    for message in got[:5]:
        acks.ack(message)
    await (await consuming.get_queue(QUEUE)).cancel(consumer_tag)
    # Closing the channel would requeue anything left unacked: only "7" may come back.
    await consuming.close()
    left = await declaring.declare_queue(QUEUE, passive=True)
    assert left.declaration_result.message_count == 1
    message = await queue.get(timeout=10)
    assert message is not None and message.body == b"7"


async def test_a_publish_that_cannot_be_framed_takes_no_sequence_number(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    """Refused before it is counted: the confirms of the publishes after it stay in step (a
    counted but unsent publish would take the next confirm, and the last would hang)."""
    declaring = await connection.channel()
    await declaring.declare_queue(QUEUE)
    pipelined, _, _ = await pipelined_on(connection)
    with pytest.raises(ValueError, match="short string"):
        pipelined.publish(
            b"x", exchange="", routing_key="q" * 256, properties=properties(), mandatory=True
        )
    returned = pipelined.publish(
        b"y", exchange="", routing_key="no.such.queue", properties=properties(), mandatory=True
    )
    kept = pipelined.publish(
        b"z", exchange="", routing_key=QUEUE, properties=properties(), mandatory=True
    )
    results = await asyncio.wait_for(asyncio.gather(returned, kept), 30)
    assert isinstance(results[0], DeliveredMessage) and results[0].body == b"y"
    assert isinstance(results[1], spec.Basic.Ack)


async def next_message(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message of `queue`, consumed (acked) by aio-pika's own consumer."""
    async with queue.iterator() as messages:
        message = await asyncio.wait_for(anext(messages), 30)
        await message.ack()
        return message


async def consuming_through_deliveries(
    connection: aio_pika.abc.AbstractConnection,
) -> tuple[Deliveries, Acks]:
    consuming = await connection.channel()
    await consuming.set_qos(prefetch_count=10)
    underlay = await consuming.get_underlay_channel()
    acks = Acks(underlay, TurnWriter(underlay.write_queue))
    return Deliveries(underlay, acks), acks


async def test_a_delivery_whose_consumer_fails_is_rejected_to_the_dead_letter_exchange(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    """The reader goes on, and the delivery is neither lost nor left unacked: rejected, so a
    queue with a dead-letter exchange (Swarm's task queues) dead-letters it."""
    declaring = await connection.channel()
    dead = await declaring.declare_queue("pipelined.dead")
    await declaring.declare_queue(
        QUEUE,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "pipelined.dead"},
    )
    deliveries, _ = await consuming_through_deliveries(connection)
    taken: list[bytes] = []

    def consumer(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if message.body == b"bad":
            raise RuntimeError("a consumer's bug")
        taken.append(message.body)

    await deliveries.consume(QUEUE, consumer)
    for body in (b"bad", b"good"):
        await declaring.default_exchange.publish(aio_pika.Message(body), QUEUE)
    letter = await next_message(dead)
    assert letter.body == b"bad"
    assert taken == [b"good"]


async def test_a_delivery_for_a_consumer_no_longer_known_goes_back_to_its_queue(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    declaring = await connection.channel()
    queue = await declaring.declare_queue(QUEUE)
    deliveries, _ = await consuming_through_deliveries(connection)
    seen: list[bytes] = []
    tag = await deliveries.consume(QUEUE, lambda message: seen.append(message.body))
    # As after a cancel RabbitMQ started on its own (the queue deleted under it).
    deliveries._consumers.pop(tag)
    await declaring.default_exchange.publish(aio_pika.Message(b"m"), QUEUE)
    await deliveries.cancel(tag)
    message = await next_message(queue)
    assert message.body == b"m" and message.redelivered
    assert seen == []


async def test_drain_waits_until_the_frames_handed_over_are_written(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    """A clean close drains first: the last turn's acks are not left in the writer."""
    declaring = await connection.channel()
    await declaring.declare_queue(QUEUE)
    pipelined, writer, _ = await pipelined_on(connection)
    confirm = pipelined.publish(
        b"x", exchange="", routing_key=QUEUE, properties=properties(), mandatory=False
    )
    await asyncio.wait_for(writer.drain(), 30)
    assert isinstance(await asyncio.wait_for(confirm, 30), spec.Basic.Ack)
