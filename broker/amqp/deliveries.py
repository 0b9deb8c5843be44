"""Deliveries of one consume channel, handed to their consumer in the connection reader's own
step.

Why: aiormq starts a task per delivery and aio-pika a second one; the ingress starts its own
anyway (broker/amqp/ingress.py), and with this that one is the only one. Each delivery is also
announced to the channel's `Acks` (broker/amqp/acks.py) before anything can fail, which its
`multiple` acks rely on.
"""

from collections.abc import Callable
from random import getrandbits

import aiormq
from aio_pika.message import IncomingMessage
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from broker.amqp.acks import Acks
from broker.lazy_logging import LazyLogger

# The hot path's logger, as before these modules were split.
log = LazyLogger("swarm.pipelined")

Consumer = Callable[[IncomingMessage], None]


class Deliveries:
    """Consumers of one consume channel (see the module). A consumer is called with aio-pika's
    IncomingMessage (its reading of the properties is the one the daemon has always used)
    and must not block: it starts what the delivery needs and returns."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, acks: Acks) -> None:
        # aiormq's own steps for a delivery, minus its task: read the content header and
        # body frames that follow the Deliver frame. Checked here, loudly, once per channel.
        read_header = getattr(channel, "_Channel__get_content_header", None)
        read_content = getattr(channel, "_read_content", None)
        if read_header is None or read_content is None or not hasattr(channel, "_on_deliver_frame"):
            raise RuntimeError("aiormq's channel changed: broker/amqp/deliveries.py needs updating")
        self._channel = channel
        self._acks = acks
        self._read_header = read_header
        self._read_content = read_content
        self._consumers: dict[str, Consumer] = {}
        channel._on_deliver_frame = self._on_deliver

    async def consume(self, queue: str, consumer: Consumer) -> str:
        tag = f"swarm.{self._channel.number}.{getrandbits(64):016x}"
        self._consumers[tag] = consumer
        try:
            await self._channel.basic_consume(queue, _not_called, consumer_tag=tag)
        except BaseException:
            self._consumers.pop(tag, None)
            raise
        return tag

    async def cancel(self, tag: str) -> None:
        # Deliveries RabbitMQ sent before its CancelOk still reach the consumer: frames are
        # read in order, and it is forgotten only after.
        await self._channel.basic_cancel(tag)
        self._consumers.pop(tag, None)

    async def _on_deliver(self, frame: spec.Basic.Deliver) -> None:
        header = await self._read_header()
        message: DeliveredMessage = await self._read_content(frame, header)
        tag = frame.delivery_tag
        assert tag is not None
        # Announced before anything can fail: a delivery the acks do not know of could be
        # covered by a later multiple ack without ever having been processed.
        self._acks.delivered(tag)
        consumer = self._consumers.get(frame.consumer_tag or "")
        if consumer is None:
            # Its consumer was cancelled (by us, or by RabbitMQ when the queue went): back to
            # the queue, for whoever consumes it next.
            log.warning("delivery_for_unknown_consumer", consumer_tag=frame.consumer_tag)
            self._acks.requeue_tag(tag)
            return
        try:
            consumer(IncomingMessage(message, no_ack=False))
        except Exception:
            # The reader must go on: a consumer's bug costs this delivery, never the
            # connection. Rejected, not requeued (it would come straight back): a task queue
            # dead-letters it to swarm.dead.
            log.exception("consumer_failed", consumer_tag=frame.consumer_tag)
            self._acks.requeue_tag(tag, requeue=False)


async def _not_called(message: DeliveredMessage) -> None:
    raise AssertionError("deliveries go through Deliveries._on_deliver")
