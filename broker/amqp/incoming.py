"""A message RabbitMQ delivered, as the rest of the daemon sees it: a `Delivery`, whose
settlement acknowledges or requeues it through its consume channel.

Why: the processors (broker/tasks/, broker/ops/control.py) know deliveries and settlements,
never aio-pika or channels; this is the one place that turns the one into the other, and the
one that sends what broker/tasks/settlement.py decided on the wire.
"""

import time

from aio_pika.abc import AbstractIncomingMessage

from broker.amqp.acks import Acks
from broker.amqp.frames import frame_extras
from broker.tasks.delivery import Delivery
from broker.tasks.settlement import Settlement

PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
)


def to_delivery(
    message: AbstractIncomingMessage, queue: str, task_type: str | None, acks: Acks
) -> Delivery:
    # The daemon's frame decoder (broker/amqp/frames.py) attached the raw headers table and, when a
    # property could not be decoded, what it was; `properties` then holds what was salvaged.
    extras = frame_extras(message)
    return Delivery(
        body=message.body,
        queue=queue,
        task_type=task_type,
        properties={name: getattr(message, name, None) for name in PROPERTY_NAMES},
        redelivered=bool(message.redelivered),
        received_at_s=time.monotonic(),
        settle_token=AmqpSettlement(message, acks),
        raw_headers=extras.raw_headers if extras is not None else None,
        properties_error=extras.error if extras is not None else None,
    )


class AmqpSettlement(Settlement):
    """Acknowledges or requeues one delivery through its channel's `Acks` (one multiple ack per loop
    turn, broker/amqp/acks.py); broker/tasks/settlement.py decides which calls are legal (a
    second ack raises). On a channel that is gone nothing is sent: RabbitMQ redelivers the message,
    and the redelivery is answered from the outcome store."""

    __slots__ = ("_acks", "_message")

    def __init__(self, message: AbstractIncomingMessage, acks: Acks) -> None:
        super().__init__()
        self._message = message
        self._acks = acks

    async def _send_ack(self) -> None:
        self._acks.ack(self._message)

    def _let_go_of_body(self) -> None:
        """Acking and requeueing need only the channel and delivery tag."""
        # setattr: the abstract type does not declare `body` in its slots; the message does.
        setattr(self._message, "body", b"")  # noqa: B010

    async def _send_requeue(self) -> None:
        self._acks.requeue(self._message)
