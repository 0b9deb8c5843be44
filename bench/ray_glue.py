"""`ray-glue`: what anyone would glue together in an afternoon from aio-pika and Ray, in a
process of its own.

The reference's AMQP code path unchanged (bench/reference.py: the same queue and arguments,
manual ack, prefetch 256, the reply published persistent on a confirm channel, its confirm
awaited, then the ack), plus one Ray actor call per task: the task body is decoded (msgpack),
its `args` go to an actor started once (`await actor.echo.remote(args)`, the ObjectRef
awaited on the event loop, never a blocking `ray.get`), and the actor's result comes back in a
protocol reply (`v`, `id`, `status: ok`, `result`), which the client checks like Swarm's.

    RAY_ADDRESS=HOST:PORT python bench/ray_glue.py AMQP_URL   # or RAY_ADDRESS=local
    # prints "ready" once its actor answered and it consumes; SIGTERM stops it
"""

import asyncio
import contextlib
import os
import signal
import sys
from typing import Any

import aio_pika
import msgpack
import ray
from aio_pika.abc import AbstractIncomingMessage
from reference import EXCHANGE, PREFETCH, QUEUE, QUEUE_ARGUMENTS, ROUTING_KEY


@ray.remote(num_cpus=1)  # one CPU, like each actor of Swarm's CPU pool
class Echo:
    def echo(self, args: Any) -> Any:
        return args


def start_ray() -> None:
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray.init(address="local", num_cpus=int(os.environ.get("BENCH_RAY_CPUS", "2")))
    else:
        ray.init(address=address)


async def serve(url: str) -> None:
    start_ray()
    actor = Echo.remote()  # type: ignore[attr-defined]
    await actor.echo.remote(b"")  # placed and started before "ready"

    connection = await aio_pika.connect(url, client_properties={"connection_name": "ray-glue"})
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
        task = msgpack.unpackb(message.body, raw=False)
        result = await actor.echo.remote(task.get("args"))
        if message.reply_to:
            reply = {"v": 1, "id": task.get("id"), "status": "ok", "result": result}
            await default.publish(
                aio_pika.Message(
                    msgpack.packb(reply, use_bin_type=True),
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
    ray.shutdown()


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
