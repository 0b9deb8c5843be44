"""RabbitMQ in memory, under the daemon's own AMQP code: the server's side.

The daemon reaches RabbitMQ through aio-pika (consuming, the outcome stream's appends) and,
on its hot publishing path, straight through aiormq. `MemoryBroker` stands in for the
server, and the objects of fakes/amqp.py for the client's, as far as broker/amqp/session.py,
broker/amqp/ingress.py and broker/amqp/publisher.py use them. The real
`AmqpSession`, `Publisher`, `OutcomePublishing` and `Ingress` run on top, as taskiq's
in-memory broker runs its real receive path.

Modelled: queues (ready messages, consumers per channel, deliveries settled by ack or nack);
publisher confirms (an ack; a basic.return for a mandatory publish no queue takes; or what a
test's rule says: a nack, an error, a publish held until the test releases it); a dropped
connection (its channels close, publishes waiting on it fail with a connection error, its
unacknowledged deliveries go back to their queues marked redelivered, close callbacks fire).

Not modelled: prefetch, bindings (a publish to a named exchange is recorded and confirmed,
not routed), TTLs. A message requeued by a nack waits in its queue until a consumer
subscribes or the test calls `MemoryQueue.dispatch()`: redelivering at once, as RabbitMQ does,
would turn a test of "processing raised, so requeue" into an endless loop.
"""

import asyncio
import itertools
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import aiormq
import pytest
from aiormq.abc import DeliveredMessage
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header

import broker.amqp.ingress
from broker.amqp.outcomes import OUTCOMES_QUEUE
from broker.amqp.session import AmqpSession
from broker.amqp.topology import Topology
from schemas.topology import DEAD_EXCHANGE, RESULTS_EXCHANGE, TASKS_EXCHANGE

from .amqp import (
    PROPERTY_NAMES,
    FakeAcks,
    FakeChannel,
    FakeConnection,
    FakeDeliveries,
    FakeExchange,
    FakeIncomingMessage,
    FakePipelined,
    FakeUnderlayChannel,
)
from .sync import Changes

# What a publish rule's action returns to have the publish routed as usual afterwards.
ROUTE = object()
Action = Callable[["Published"], Awaitable[object]]


@dataclass
class Published:
    """One publish as the broker saw it; `confirm` says how it was answered: "ack",
    "returned", "nack", "error" or "lost" (the connection dropped first); None while held."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Any
    mandatory: bool
    connection: int
    channel: int  # which channel of the broker's, numbered from 1 in the order opened
    confirm: str | None = None

    def wire_properties(self) -> Any:
        """The properties as a consumer decodes them off the wire (pamqp's Basic.Properties;
        the headers of a dead letter are written as raw bytes until then)."""
        if self.properties is None:
            return None
        content = pamqp_header.ContentHeader(body_size=len(self.body), properties=self.properties)
        _, _, decoded = pamqp_frame.unmarshal(pamqp_frame.marshal(content, 1))
        assert isinstance(decoded, pamqp_header.ContentHeader)
        return decoded.properties

    @property
    def headers(self) -> dict[str, Any]:
        properties = self.wire_properties()
        return dict(properties.headers or {}) if properties is not None else {}


@dataclass
class PublishRule:
    """What the broker does with publishes that match (None matches anything), for the
    next `times` of them (None: all)."""

    action: Action
    exchange: str | None = None
    routing_key: str | None = None
    times: int | None = None

    def matches(self, published: Published) -> bool:
        return (
            (self.times is None or self.times > 0)
            and (self.exchange is None or self.exchange == published.exchange)
            and (self.routing_key is None or self.routing_key == published.routing_key)
        )


class Gate:
    """Publishes held by a `MemoryBroker.hold` rule: `entered` lists them as they arrive;
    `release()` lets every one held (and every later one) through to be routed."""

    def __init__(self, broker: "MemoryBroker") -> None:
        self._broker = broker
        self.entered: list[Published] = []
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def wait_entered(self, count: int = 1) -> None:
        """Until `count` publishes are held here."""
        await self._broker.changes.until(
            lambda: len(self.entered) >= count, f"{count} publish(es) to be held"
        )

    def release(self) -> None:
        if not self.opened.done():
            self.opened.set_result(None)

    async def __call__(self, published: Published) -> object:
        self.entered.append(published)
        self._broker.changes.notify()
        connection = self._broker.connections[published.connection - 1]
        await asyncio.wait({self.opened, connection.closed}, return_when=asyncio.FIRST_COMPLETED)
        if not self.opened.done():
            raise ConnectionError("connection lost while the publish waited for its confirm")
        return ROUTE


async def nack(published: Published) -> object:
    """RabbitMQ refused the message (a full queue with reject-publish, say)."""
    raise aiormq.exceptions.DeliveryError(None, aiormq.spec.Basic.Nack(delivery_tag=1))


async def returned(published: Published) -> object:
    """A mandatory message no queue took: basic.return, then the confirm."""
    return returned_message(published)


def returned_message(published: Published) -> DeliveredMessage:
    """What aiormq's basic_publish returns for a message RabbitMQ returned."""
    delivery = aiormq.spec.Basic.Return(
        reply_code=312,
        reply_text="NO_ROUTE",
        exchange=published.exchange,
        routing_key=published.routing_key,
    )
    return DeliveredMessage(
        delivery=delivery,
        header=pamqp_header.ContentHeader(),
        body=published.body,
        channel=cast(Any, None),
    )


def failing(error: BaseException) -> Action:
    async def fail(published: Published) -> object:
        raise error

    return fail


@dataclass
class Message:
    """A message in a memory queue. `history` lists what happened to it, in order:
    "delivered", "acked", "requeued" (a nack), "returned" (its channel closed unacked)."""

    body: bytes
    properties: dict[str, Any]
    redelivered: bool = False
    history: list[str] = field(default_factory=list)

    @property
    def acked(self) -> bool:
        return "acked" in self.history

    @property
    def requeues(self) -> int:
        return self.history.count("requeued") + self.history.count("returned")

    @property
    def settled(self) -> bool:
        """Acked, or handed back to its queue since it was last delivered."""
        return bool(self.history) and self.history[-1] in ("acked", "requeued", "returned")


class MemoryQueue:
    """A queue: ready messages in order, consumers by tag, each on the channel it consumed
    on. Deliveries go to the consumers in turn (each callback in a task, as aio-pika does)."""

    def __init__(self, broker: "MemoryBroker", name: str) -> None:
        self.broker = broker
        self.name = name
        self.ready: deque[Message] = deque()
        self.consumers: dict[str, tuple[Callable[[Any], Awaitable[Any]], FakeChannel]] = {}
        self.delivered: list[Message] = []  # every message ever put here, in order
        self._turn = itertools.count()

    def put(self, message: Message) -> Message:
        self.delivered.append(message)
        self.ready.append(message)
        self.dispatch()
        return message

    def dispatch(self) -> None:
        """Deliver ready messages to the consumers, if there are any."""
        while self.ready and self.consumers:
            tags = sorted(self.consumers)
            tag = tags[next(self._turn) % len(tags)]
            callback, channel = self.consumers[tag]
            message = self.ready.popleft()
            incoming = FakeIncomingMessage(self, message, channel)
            channel.unacked.append(incoming)
            message.history.append("delivered")
            self.broker.spawn(callback(incoming))
        self.broker.changes.notify()

    def requeue(self, message: Message, why: str) -> None:
        message.redelivered = True
        message.history.append(why)
        self.ready.appendleft(message)
        self.broker.changes.notify()


class _SessionOpener:
    """Stands in for the `AmqpSession` class in broker/amqp/ingress.py: `open` opens a session on
    the memory broker (the real AmqpSession, on fake connection and channels)."""

    def __init__(self, broker: "MemoryBroker") -> None:
        self._broker = broker

    async def open(self, url: str, prefetch: int) -> AmqpSession:
        return await self._broker.open_session()


class MemoryBroker:
    """The server: queues, the outcome stream, every publish, the connections opened.

    `install(monkeypatch)` makes broker/amqp/ingress.py open its sessions here. `changes` is
    notified on every change, for `Changes.until`.
    """

    def __init__(self, changes: Changes | None = None, queues: Iterable[str] = ()) -> None:
        self.changes = changes or Changes()
        self.queues: dict[str, MemoryQueue] = {}
        for name in queues:
            self.queue(name)
        self.published: list[Published] = []
        self.stream: list[bytes] = []  # the outcome stream (swarm.outcomes), in order
        self.connections: list[FakeConnection] = []
        self.rules: list[PublishRule] = []
        self.channel_numbers = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(broker.amqp.ingress, "AmqpSession", _SessionOpener(self))

    def queue(self, name: str) -> MemoryQueue:
        if name not in self.queues:
            self.queues[name] = MemoryQueue(self, name)
        return self.queues[name]

    def spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections -------------------------------------------------------------------------
    async def open_session(self) -> AmqpSession:
        """A session as AmqpSession.open makes it, minus the declarations."""
        connection = FakeConnection(self, len(self.connections) + 1)
        self.connections.append(connection)
        publish_channel = connection.open_channel()
        consume_channel = connection.open_channel()
        topology = Topology(
            cast(Any, FakeExchange(TASKS_EXCHANGE)),
            cast(Any, FakeExchange(DEAD_EXCHANGE)),
            cast(Any, FakeExchange(RESULTS_EXCHANGE)),
            {},
            cast(Any, None),
            cast(Any, None),
        )
        reply_channel = connection.open_channel()
        session = AmqpSession(
            cast(Any, connection),
            cast(Any, publish_channel),
            cast(Any, consume_channel),
            cast(Any, reply_channel),
            topology,
            cast(Any, SimpleNamespace(close=lambda: None)),
            cast(Any, FakePipelined(reply_channel.underlay)),
            cast(Any, FakeAcks(consume_channel)),
            cast(Any, FakeDeliveries(consume_channel)),
        )
        self.changes.notify()
        return session

    @property
    def connection(self) -> FakeConnection:
        """The connection opened last."""
        return self.connections[-1]

    # -- publishing --------------------------------------------------------------------------
    def on_publish(
        self,
        action: Action,
        *,
        exchange: str | None = None,
        routing_key: str | None = None,
        times: int | None = None,
    ) -> PublishRule:
        """Answer matching publishes with `action` (`nack`, `returned`, `failing(...)`, a
        `Gate`) instead of routing them; rules are tried in the order they were added."""
        rule = PublishRule(action, exchange, routing_key, times)
        self.rules.append(rule)
        return rule

    def hold(
        self, *, exchange: str | None = None, routing_key: str | None = None, times: int = 1
    ) -> Gate:
        """Hold matching publishes unconfirmed until `Gate.release()`."""
        gate = Gate(self)
        self.on_publish(gate, exchange=exchange, routing_key=routing_key, times=times)
        return gate

    async def publish_on(
        self,
        channel: FakeUnderlayChannel,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Any,
        mandatory: bool,
    ) -> object:
        """A basic_publish on `channel`: what its confirm is (or what it raises)."""
        number = channel.connection.number
        published = Published(
            exchange, routing_key, body, properties, mandatory, number, channel.number
        )
        return await self.publish(published)

    async def publish(self, published: Published) -> object:
        self.published.append(published)
        self.changes.notify()
        rule = next((r for r in self.rules if r.matches(published)), None)
        try:
            if rule is not None:
                if rule.times is not None:
                    rule.times -= 1
                result = await rule.action(published)
                if result is not ROUTE:
                    was_returned = isinstance(result, DeliveredMessage)
                    published.confirm = "returned" if was_returned else "ack"
                    return result
            if self.connections[published.connection - 1].is_closed:
                raise ConnectionError("connection lost before the confirm")
            return self._route(published)
        except aiormq.exceptions.DeliveryError:
            published.confirm = "nack"
            raise
        except ConnectionError:
            published.confirm = "lost"
            raise
        except BaseException:
            published.confirm = "error"
            raise
        finally:
            self.changes.notify()

    def _route(self, published: Published) -> object:
        ack = aiormq.spec.Basic.Ack(delivery_tag=1)
        published.confirm = "ack"
        if published.exchange != "":
            return ack  # recorded only: bindings are not modelled
        if published.routing_key == OUTCOMES_QUEUE:
            self.stream.append(published.body)
            return ack
        queue = self.queues.get(published.routing_key)
        if queue is None:
            if published.mandatory:
                published.confirm = "returned"
                return returned_message(published)
            return ack
        properties = published.wire_properties()
        values: dict[str, Any] = {}
        if properties is not None:
            for name in PROPERTY_NAMES:
                attribute = "message_type" if name == "type" else name
                values[name] = getattr(properties, attribute, None)
        queue.put(Message(published.body, values))
        return ack

    def to(self, *, exchange: str | None = None, routing_key: str | None = None) -> list[Published]:
        """The publishes to `exchange` (and `routing_key`), in order, confirmed or not."""
        return [
            p
            for p in self.published
            if (exchange is None or p.exchange == exchange)
            and (routing_key is None or p.routing_key == routing_key)
        ]
