"""The Dramatiq side of the bench: one no-op actor that returns its argument, on the vhost in
BENCH_AMQP_URL. Dramatiq has no reply channel of its own for RabbitMQ, so a small middleware
publishes each result (JSON) to the `reply_to` queue named in the message's options, with
its `correlation_id`, persistent, on Dramatiq's own confirm channel, before Dramatiq acks the
message. The worker prefetches 256 (env `dramatiq_queue_prefetch`, set by bench/extras.py);
its queues are quorum queues, like the other systems' task queue.

    dramatiq dramatiq_app --processes 1 --threads 8   # run from bench/
"""

import json
import os
from typing import Any

import dramatiq
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import Middleware

QUEUE = "bench.dramatiq"


class Reply(Middleware):
    def after_process_message(
        self,
        broker: Any,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        reply_to = message.options.get("reply_to")
        if not reply_to:
            return
        body = {"ok": exception is None, "result": result}
        if exception is not None:
            body["error"] = repr(exception)
        broker.channel.basic_publish(
            exchange="",
            routing_key=reply_to,
            body=json.dumps(body).encode(),
            properties=pika.BasicProperties(
                correlation_id=message.options.get("correlation_id"),
                content_type="application/json",
                delivery_mode=2,
            ),
        )


class QuorumBroker(RabbitmqBroker):  # type: ignore[misc]
    """Dramatiq's RabbitMQ broker with quorum queues, like the other systems' task queue."""

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments: dict[str, Any] = super()._build_queue_arguments(queue_name)
        arguments["x-queue-type"] = "quorum"
        return arguments


broker = QuorumBroker(url=os.environ["BENCH_AMQP_URL"], confirm_delivery=True)
broker.add_middleware(Reply())
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="noop", queue_name=QUEUE, max_retries=0)
def noop(payload: str) -> str:
    return payload
