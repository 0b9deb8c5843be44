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

from broker.amqp.pipelined import Acks, PipelinedChannel, TurnWriter

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
        acks.delivered(message)
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
