"""The reference: the least a task daemon must do, with aio-pika, in a process of its own.

It consumes the same queue as Swarm (a durable quorum queue `swarm.tasks.inference` bound to
the direct exchange `swarm.tasks`, declared here with Swarm's arguments so RabbitMQ does the
same work for both) with manual acknowledgement and a prefetch of 256; for each delivery it
publishes the body back to `reply_to` (same `correlation_id`, persistent, on a confirm
channel), waits for RabbitMQ's confirm, and only then acknowledges the task. Nothing else: no
decoding, no validation, no scheduling, no copies to other exchanges.

    python bench/reference.py AMQP_URL   # prints "ready" once it consumes; SIGTERM stops it
"""

import asyncio
import contextlib
import signal
import sys

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

PREFETCH = 256
QUEUE = "swarm.tasks.inference"
EXCHANGE = "swarm.tasks"
ROUTING_KEY = "inference"
QUEUE_ARGUMENTS = {
    "x-queue-type": "quorum",
    "x-single-active-consumer": True,
    "x-dead-letter-exchange": "swarm.dead",
}


async def serve(url: str) -> None:
    connection = await aio_pika.connect(url, client_properties={"connection_name": "reference"})
    publish_channel = await connection.channel(publisher_confirms=True)
    consume_channel = await connection.channel()
    await consume_channel.set_qos(prefetch_count=PREFETCH)
    exchange = await publish_channel.declare_exchange(
        EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    queue = await consume_channel.declare_queue(QUEUE, durable=True, arguments=QUEUE_ARGUMENTS)
    await queue.bind(exchange, ROUTING_KEY)
    default = publish_channel.default_exchange

    async def on_message(message: AbstractIncomingMessage) -> None:
        if message.reply_to:
            await default.publish(
                aio_pika.Message(
                    message.body,
                    content_type=message.content_type,
                    correlation_id=message.correlation_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                message.reply_to,
            )
        await message.ack()

    await queue.consume(on_message)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    await stop.wait()
    with contextlib.suppress(Exception):
        await connection.close()


def main() -> None:
    url = sys.argv[1]
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(url))
    else:
        uvloop.run(serve(url))


if __name__ == "__main__":
    main()
