"""AMQP in: consume the task and control queues, hand each delivery to its processor, publish
the outcome, and only then acknowledge. The one place that decides ack and requeue."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from broker.delivery import Delivery
from broker.outcome import Outcome
from broker.outcomes import OutcomeStore
from broker.publisher import Publisher
from broker.topology import Topology, declare

log = structlog.get_logger("swarm.ingress")

Processor = Callable[[Delivery], Awaitable[Outcome]]

_PROPERTY_NAMES = (
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


def to_delivery(message: AbstractIncomingMessage, queue: str, task_type: str | None) -> Delivery:
    return Delivery(
        body=message.body,
        queue=queue,
        task_type=task_type,
        properties={name: getattr(message, name, None) for name in _PROPERTY_NAMES},
        redelivered=bool(message.redelivered),
        received_at_s=time.monotonic(),
        settle_token=AmqpSettlement(message),
    )


@dataclass
class _Consumer:
    """One consumed queue. `paused` is the wanted state; `tag` is the live consumer, if any."""

    queue: AbstractQueue
    callback: Callable[[AbstractIncomingMessage], Awaitable[None]]
    tag: str | None = None
    paused: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Ingress:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        prefetch: int,
        process_task: Processor,
        process_control: Processor,
        store: OutcomeStore,
        on_settled: Callable[[Outcome], None],
        max_waiting_per_queue: int = 64,
    ) -> None:
        self._store = store
        self._on_settled = on_settled
        self._connection = connection
        self._prefetch = prefetch
        self._process_task = process_task
        self._process_control = process_control
        self._max_waiting = max_waiting_per_queue
        self._in_flight: set[asyncio.Task[None]] = set()
        # Deliveries seen, and how many of them RabbitMQ marked as redelivered.
        self.received = 0
        self.redelivered = 0
        self._consumers: dict[str, _Consumer] = {}
        self._stopping = False
        self._consume_channel: AbstractChannel | None = None
        self._topology: Topology | None = None
        self._publisher: Publisher | None = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def start(self) -> None:
        publish_channel = await self._connection.channel(publisher_confirms=True)
        topology = await declare(publish_channel)
        self._topology = topology
        self._publisher = Publisher(publish_channel, topology.results, topology.dead)
        await self._store.attach(self._connection, publish_channel)
        consume_channel = await self._connection.channel()
        await consume_channel.set_qos(prefetch_count=self._prefetch)
        self._consume_channel = consume_channel
        for task_type, declared in topology.task_queues.items():
            queue = await consume_channel.get_queue(declared.name, ensure=False)
            await self._consume(queue, task_type, self._process_task)
        control = await consume_channel.get_queue(topology.control.name, ensure=False)
        await self._consume(control, None, self._process_control)

    async def _consume(
        self, queue: AbstractQueue, task_type: str | None, process: Processor
    ) -> None:
        async def on_message(message: AbstractIncomingMessage) -> None:
            delivery = to_delivery(message, queue.name, task_type)
            self.received += 1
            self.redelivered += delivery.redelivered
            task = asyncio.create_task(self._handle(delivery, process))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

        consumer = _Consumer(queue, on_message)
        self._consumers[queue.name] = consumer
        await self._apply(consumer)

    def on_waiting(self, queue_name: str, waiting: int) -> None:
        """Backpressure from the scheduler: stop consuming a queue whose tasks pile up waiting
        for room, so the backlog stays in RabbitMQ; resume when half of them were placed."""
        consumer = self._consumers.get(queue_name)
        if consumer is None:
            return
        if not consumer.paused and waiting >= self._max_waiting:
            consumer.paused = True
        elif consumer.paused and waiting <= self._max_waiting // 2:
            consumer.paused = False
        else:
            return
        log.info(
            "consumer paused" if consumer.paused else "consumer resumed",
            queue=queue_name,
            waiting=waiting,
        )
        task = asyncio.create_task(self._apply(consumer))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    def is_paused(self, queue_name: str) -> bool:
        return self._consumers[queue_name].tag is None

    async def _apply(self, consumer: _Consumer) -> None:
        """Bring the consumer to its wanted state; serialised so the last wish wins."""
        async with consumer.lock:
            want_consuming = not consumer.paused and not self._stopping
            if want_consuming and consumer.tag is None:
                consumer.tag = await consumer.queue.consume(consumer.callback)
            elif not want_consuming and consumer.tag is not None:
                tag, consumer.tag = consumer.tag, None
                try:
                    await consumer.queue.cancel(tag)
                except Exception as exc:
                    log.warning(
                        "could not cancel a consumer", queue=consumer.queue.name, error=str(exc)
                    )

    async def _handle(self, delivery: Delivery, process: Processor) -> None:
        assert self._publisher is not None and delivery.settle_token is not None
        settlement = delivery.settle_token
        outcome: Outcome | None = None
        try:
            outcome = await process(delivery)
            record = None
            if outcome.recorded:
                assert outcome.task_id is not None
                record = self._store.outcome_record(
                    outcome.task_id, outcome.status, outcome.reply_body
                )
            if outcome.reply:
                await self._publisher.publish_outcome(delivery, outcome, record)
            if record is not None:
                self._store.apply(record)
        except asyncio.CancelledError:
            # Shutting down: hand the task back to RabbitMQ for another daemon.
            await settlement.requeue()
            raise
        except Exception:
            log.exception(
                "could not process or answer a delivery; it goes back to the queue",
                queue=delivery.queue,
                message_id=delivery.message_id,
            )
            await settlement.requeue()
            return
        finally:
            if outcome is not None:
                self._on_settled(outcome)
        await settlement.ack()

    async def renew(self, delivery: Delivery, lease: int) -> None:
        """Put a renewal copy of a long task's message on its queue (confirmed)."""
        assert self._publisher is not None
        await self._publisher.republish(delivery, lease)

    async def queue_depths(self) -> dict[str, int]:
        assert self._topology is not None
        channel = await self._connection.channel()
        try:
            depths = {}
            queues = [
                *self._topology.task_queues.values(),
                self._topology.control,
                self._topology.dead_queue,
            ]
            for queue in queues:
                declared = await channel.declare_queue(queue.name, passive=True)
                depths[queue.name] = int(declared.declaration_result.message_count or 0)
            return depths
        finally:
            await channel.close()

    async def stop_consuming(self) -> None:
        """Stop taking new deliveries; those in flight go on."""
        self._stopping = True
        for consumer in self._consumers.values():
            await self._apply(consumer)

    async def drain(self, timeout_s: float) -> int:
        """Wait for in-flight deliveries up to `timeout_s`; requeue the rest. Returns requeued."""
        pending: set[asyncio.Task[None]] = set(self._in_flight)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)


class AmqpSettlement:
    """Acknowledges or requeues one delivery, once. A long task's delivery may be acked early,
    when its renewal copy is safely queued, and again at the end: the second call is a no-op."""

    __slots__ = ("_message", "_settled")

    def __init__(self, message: AbstractIncomingMessage) -> None:
        self._message = message
        self._settled = False

    async def ack(self) -> None:
        if self._settled:
            return
        self._settled = True
        try:
            await self._message.ack()
        except Exception as exc:
            # The channel went away after the outcome was confirmed: RabbitMQ will redeliver,
            # and the redelivery is acknowledged from the outcome store without a reply.
            log.warning("ack failed after the outcome was published", error=str(exc))

    async def requeue(self) -> None:
        if self._settled:
            return
        self._settled = True
        try:
            await self._message.nack(requeue=True)
        except Exception as exc:
            log.warning("could not requeue; RabbitMQ redelivers on channel close", error=str(exc))
