"""The redelivery bound against the real RabbitMQ: what a quorum task queue does with
`x-delivery-count` (a producer's value on a first delivery, RabbitMQ's own on a redelivery),
and a daemon answering a task delivered too often `redelivery_limit` instead of running it
again; a result too large to publish answered `too_large` without costing the connection."""

import asyncio
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from raw import RawProducer, task

from broker.amqp.topology import declare
from broker.daemon import Daemon
from schemas.topology import DELIVERY_COUNT_HEADER, task_queue

Seen = tuple[bool, Any]  # (redelivered, x-delivery-count as it arrived)


async def requeued(amqp_url: str, queue: str, times: int) -> list[Seen]:
    """Take the one message of `queue` and hand it back `times` times, then leave it
    there; what each delivery looked like."""
    seen: list[Seen] = []
    done = asyncio.Event()
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        source = await channel.get_queue(queue, ensure=False)

        async def on_message(message: AbstractIncomingMessage) -> None:
            seen.append(
                (bool(message.redelivered), (message.headers or {}).get("x-delivery-count"))
            )
            if len(seen) > times:
                done.set()  # held (unacknowledged) until the channel closes: back once more
                return
            await message.nack(requeue=True)

        await source.consume(on_message)
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await connection.close()
    return seen


@pytest.fixture
async def topology(producer: RawProducer) -> None:
    await declare(producer.channel)


@pytest.mark.usefixtures("topology")
async def test_rabbitmq_ignores_a_producers_count_on_a_first_delivery_and_overwrites_it_after(
    amqp_url: str, producer: RawProducer
) -> None:
    await producer.publish("inference", task(id="forged"), headers={DELIVERY_COUNT_HEADER: 99})
    seen = await requeued(amqp_url, task_queue("inference"), times=2)
    # A first delivery is not marked redelivered, whatever the header says (Swarm reads the
    # count only then); each redelivery carries RabbitMQ's own count, not the producer's.
    assert seen == [(False, 99), (True, 1), (True, 2)]


@pytest.mark.usefixtures("topology")
async def test_a_task_delivered_past_the_limit_is_answered_and_dead_lettered(
    amqp_url: str, producer: RawProducer, start_daemon: Any
) -> None:
    inbox = await producer.inbox()
    dead = await producer.watch_dead()
    await producer.publish("inference", task(id="worn", args=1), reply_to=inbox.name)
    # Delivered 4 times before the daemon sees it (3 requeues and a channel close): its 5th
    # delivery is past a limit of 4. A task forging a high count runs as usual.
    await requeued(amqp_url, task_queue("inference"), times=3)
    await producer.publish(
        "inference",
        task(id="forged-high", args=2),
        reply_to=inbox.name,
        headers={DELIVERY_COUNT_HEADER: 1000},
    )
    daemon: Daemon = await start_daemon(max_deliveries=4)
    replies = {r.payload["id"]: r.payload for r in await inbox.wait_for(2)}
    assert replies["worn"]["status"] == "error"
    assert replies["worn"]["error"]["code"] == "redelivery_limit"
    assert "5 times" in replies["worn"]["error"]["message"]
    assert replies["forged-high"]["status"] == "ok" and replies["forged-high"]["result"] == 2
    letter = await dead.one()
    assert letter.headers["x-swarm-error-code"] == "redelivery_limit"
    assert letter.payload["id"] == "worn"
    assert daemon.ingress is not None and daemon.ingress.sessions == 1


async def test_a_result_too_large_to_publish_is_answered_too_large_on_the_same_connection(
    producer: RawProducer, start_daemon: Any
) -> None:
    daemon: Daemon = await start_daemon(max_reply_mb=1)
    inbox = await producer.inbox()
    big = bytes(1536 * 1024)  # echoed back: a reply over 1 MiB
    await producer.publish("inference", task(id="big", args=big), reply_to=inbox.name)
    await producer.publish("inference", task(id="small", args=1), reply_to=inbox.name)
    replies = {r.payload["id"]: r.payload for r in await inbox.wait_for(2)}
    assert replies["big"]["status"] == "error"
    assert replies["big"]["error"]["code"] == "too_large"
    assert replies["small"]["status"] == "ok"
    assert daemon.ingress is not None and daemon.ingress.sessions == 1
