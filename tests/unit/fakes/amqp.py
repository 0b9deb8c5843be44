"""The client side of RabbitMQ in memory: aio-pika's and aiormq's objects, as far as
broker/amqp/session.py, broker/amqp/ingress.py and broker/amqp/publisher.py use them.

`FakeConnection` (aio-pika's connection and aiormq's at once), `FakeChannel` (aio-pika's
channel), `FakeUnderlayChannel` (aiormq's, with `basic_publish` and confirms), `FakeExchange`,
`QueueHandle` (a queue as got from one channel) and `FakeIncomingMessage` (a delivery, acked
or nacked). Each talks to the server in fakes/server.py, which decides what a publish gets
back and where deliveries go.
"""

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import aio_pika

from broker.amqp.incoming import PROPERTY_NAMES

if TYPE_CHECKING:
    from .server import MemoryBroker, MemoryQueue, Message

# RabbitMQ's default frame_max: the budget replies and dead letters are fitted to.
FRAME_MAX = 131072


class Callbacks:
    """aio-pika's `close_callbacks`, as far as AmqpSession uses them."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[..., object]] = []

    def add(self, callback: Callable[..., object]) -> None:
        self._callbacks.append(callback)

    def fire(self, closed: object, error: BaseException | None) -> None:
        for callback in list(self._callbacks):
            callback(closed, error)


class FakeIncomingMessage:
    """aio-pika's IncomingMessage: the delivered body and properties, ack and nack."""

    def __init__(self, queue: "MemoryQueue", message: "Message", channel: "FakeChannel") -> None:
        self._queue = queue
        self.message = message
        self._channel = channel
        self.body = message.body
        for name in PROPERTY_NAMES:
            setattr(self, name, message.properties.get(name))
        self.redelivered = message.redelivered
        self.cluster_id = None  # the daemon's frame decoder would put FrameExtras here
        self.acks = 0
        self.nacks = 0

    @property
    def delivery_tag(self) -> int:
        return id(self)

    def _settle(self) -> None:
        if self._channel.is_closed:
            raise aio_pika.exceptions.ChannelInvalidStateError("channel closed")
        self._channel.unacked.remove(self)

    async def ack(self, multiple: bool = False) -> None:
        self.ack_now()

    def ack_now(self) -> None:
        self.acks += 1
        self._settle()
        self.message.history.append("acked")
        self._queue.broker.changes.notify()

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        self.nack_now(requeue)

    def nack_now(self, requeue: bool = True) -> None:
        self.nacks += 1
        self._settle()
        if requeue:
            self._queue.requeue(self.message, "requeued")
        else:
            self.message.history.append("rejected")
            self._queue.broker.changes.notify()


class FakeExchange:
    """aio-pika's exchange: a name, and `publish` (the outcome stream's appends)."""

    def __init__(self, name: str, channel: "FakeUnderlayChannel | None" = None) -> None:
        self.name = name
        self._channel = channel

    async def publish(
        self, message: aio_pika.Message, routing_key: str, *, mandatory: bool = True, **_: Any
    ) -> object:
        assert self._channel is not None, "publish on a declared-only exchange"
        return await self._channel.basic_publish(
            message.body, exchange=self.name, routing_key=routing_key, mandatory=mandatory
        )


class FakeUnderlayChannel:
    """aiormq's channel: `basic_publish` with confirms, its connection, close."""

    def __init__(self, connection: "FakeConnection") -> None:
        self.connection = connection
        self.number = next(connection.broker.channel_numbers)
        self.is_closed = False

    async def basic_publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: Any = None,
        mandatory: bool = False,
        **_: Any,
    ) -> object:
        if self.is_closed:
            raise ConnectionError("channel is closed")
        return await self.connection.broker.publish_on(
            self, exchange, routing_key, body, properties, mandatory
        )

    async def close(self) -> None:
        self.is_closed = True


class FakeAcks:
    """broker/amqp/pipelined.py's `Acks` of one consume channel: each ack or requeue at once
    (the real one writes a loop turn's together); nothing when the channel is gone."""

    def __init__(self, channel: "FakeChannel") -> None:
        self.channel = channel

    def ack(self, message: FakeIncomingMessage) -> None:
        if not self.channel.is_closed:
            message.ack_now()

    def requeue(self, message: FakeIncomingMessage) -> None:
        if not self.channel.is_closed:
            message.nack_now(requeue=True)


class FakeDeliveries:
    """broker/amqp/pipelined.py's `Deliveries` of one consume channel: consumers are plain
    functions, called with each delivery."""

    def __init__(self, channel: "FakeChannel") -> None:
        self.channel = channel
        self._handles: dict[str, QueueHandle] = {}

    async def consume(self, queue: str, consumer: Callable[[Any], None]) -> str:
        handle = await self.channel.get_queue(queue)

        async def deliver(message: Any) -> None:
            consumer(message)

        tag = await handle.consume(deliver)
        self._handles[tag] = handle
        return tag

    async def cancel(self, tag: str) -> None:
        await self._handles.pop(tag).cancel(tag)


class FakePipelined:
    """broker/amqp/pipelined.py's `PipelinedChannel`: each publish through the underlay channel's
    `basic_publish`, its confirm the future returned."""

    def __init__(self, channel: "FakeUnderlayChannel") -> None:
        self._channel = channel

    @property
    def frame_max(self) -> int:
        return FRAME_MAX

    def publish(
        self, body: bytes, *, exchange: str, routing_key: str, properties: Any, mandatory: bool
    ) -> "asyncio.Future[object]":
        if self._channel.is_closed:
            raise aio_pika.exceptions.ChannelInvalidStateError("channel is closed")
        return asyncio.ensure_future(
            self._channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
            )
        )


class FakeChannel:
    """aio-pika's channel: the default exchange, queues to consume, the aiormq channel."""

    def __init__(self, connection: "FakeConnection") -> None:
        self.connection = connection
        self.close_callbacks = Callbacks()
        self.underlay = FakeUnderlayChannel(connection)
        self.default_exchange = FakeExchange("", self.underlay)
        self.unacked: list[FakeIncomingMessage] = []
        self.is_closed = False

    async def get_underlay_channel(self) -> FakeUnderlayChannel:
        if self.is_closed:
            raise aio_pika.exceptions.ChannelInvalidStateError("channel is closed")
        return self.underlay

    async def get_queue(self, name: str, ensure: bool = True) -> "QueueHandle":
        return QueueHandle(self.connection.broker.queue(name), self)

    async def close(self) -> None:
        self.shut(None)

    def shut(self, error: BaseException | None) -> None:
        """Closed by us or by RabbitMQ: consumers go, unacked deliveries are requeued."""
        if self.is_closed:
            return
        self.is_closed = True
        self.underlay.is_closed = True
        for queue in self.connection.broker.queues.values():
            for tag, (_, channel) in list(queue.consumers.items()):
                if channel is self:
                    del queue.consumers[tag]
        for incoming in reversed(self.unacked):
            incoming._queue.requeue(incoming.message, "returned")
        self.unacked.clear()
        self.close_callbacks.fire(self, error)


class QueueHandle:
    """aio-pika's queue, as got from one channel: consume and cancel on that channel."""

    def __init__(self, queue: "MemoryQueue", channel: FakeChannel) -> None:
        self.queue = queue
        self.name = queue.name
        self._channel = channel
        self._tags = itertools.count(1)

    async def consume(self, callback: Callable[[Any], Awaitable[Any]], **_: Any) -> str:
        if self._channel.is_closed:
            raise aio_pika.exceptions.ChannelInvalidStateError("channel is closed")
        tag = f"ctag-{self._channel.connection.number}-{self.name}-{next(self._tags)}"
        self.queue.consumers[tag] = (callback, self._channel)
        self.queue.dispatch()
        return tag

    async def cancel(self, consumer_tag: str, **_: Any) -> None:
        if self._channel.is_closed:
            raise aio_pika.exceptions.ChannelInvalidStateError("channel is closed")
        self.queue.consumers.pop(consumer_tag, None)
        self.queue.broker.changes.notify()


class FakeConnection:
    """One AMQP connection (aio-pika's and aiormq's at once): channels, close, a drop."""

    def __init__(self, broker: "MemoryBroker", number: int) -> None:
        self.broker = broker
        self.number = number
        self.close_callbacks = Callbacks()
        self.connection_tune = SimpleNamespace(frame_max=FRAME_MAX)
        self.channels: list[FakeChannel] = []
        self.is_closed = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def open_channel(self) -> FakeChannel:
        channel = FakeChannel(self)
        self.channels.append(channel)
        return channel

    async def channel(
        self, publisher_confirms: bool = True, on_return_raises: bool = True
    ) -> FakeUnderlayChannel:
        """aiormq's `connection.channel()` (the dead-letter and re-send channels are opened
        this way); a returned publish resolves to the message either way, as with
        `on_return_raises=False`, which is how Swarm opens them."""
        if self.is_closed:
            raise ConnectionError("connection is closed")
        return self.open_channel().underlay

    async def close(self) -> None:
        self.shut(None)

    def lose(self) -> None:
        """The network dropped it: as RabbitMQ sees a dead client."""
        self.shut(ConnectionError("connection lost"))

    def shut(self, error: BaseException | None) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        self.closed.set_result(None)
        for channel in self.channels:
            channel.shut(error)
        self.close_callbacks.fire(self, error)
        self.broker.changes.notify()
