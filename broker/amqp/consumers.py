"""Which queues the ingress consumes right now, and why it paused the others.

Why: backpressure keeps a backlog in RabbitMQ, where it is durable and visible to every
daemon, instead of in this process's memory. A consumer pauses for either of two reasons: the
scheduler has too many of its queue's tasks waiting for room (`on_waiting`), or, for a task
queue, the bodies held unsettled reached their byte limit (broker/tasks/held.py). It consumes
again only when neither holds. Each change is applied in the background and serialised per
queue, so the last wish wins; a session opened after a lost connection applies them all again.
"""

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from aio_pika.abc import AbstractIncomingMessage

from broker.amqp.acks import Acks
from broker.amqp.deliveries import Deliveries
from broker.amqp.session import AmqpSession
from broker.tasks.held import HeldBytes

# The ingress's logger: these lines are the ingress's, as they were before this module.
log = structlog.get_logger("swarm.ingress")

OnMessage = Callable[[AbstractIncomingMessage, Acks], None]


@dataclass
class QueueConsumer:
    """One consumed queue across sessions. `waiting_paused` (the scheduler's backpressure) and,
    for a task queue, the ingress's held-bytes limit are the reasons to pause; it consumes
    only when neither holds. `tag` is the live consumer on the current session's channel."""

    queue_name: str
    callback: Callable[..., None]
    task_queue: bool
    # The current session's consume channel: its consumers, and how it acknowledges
    # (broker/amqp/deliveries.py, broker/amqp/acks.py).
    deliveries: Deliveries | None = None
    acks: Acks | None = None
    tag: str | None = None
    waiting_paused: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Consumers:
    """The ingress's consumers, one per queue, paused and resumed (see the module).

    `in_flight` is the ingress's set of tasks drained at stop: changes being applied join it,
    like the deliveries. `stopping()` true pauses every consumer."""

    def __init__(
        self,
        held: HeldBytes,
        max_waiting_per_queue: int,
        in_flight: set[asyncio.Task[None]],
        stopping: Callable[[], bool],
    ) -> None:
        self.held = held
        self._max_waiting = max_waiting_per_queue
        self._in_flight = in_flight
        self._stopping = stopping
        self._applying: set[asyncio.Task[None]] = set()
        self._by_queue: dict[str, QueueConsumer] = {}
        # Notified each time a consumer was brought to its wanted state (paused or resumed).
        self.changed = asyncio.Condition()

    @property
    def queue_names(self) -> list[str]:
        return list(self._by_queue)

    def add(self, queue_name: str, on_message: OnMessage, *, task_queue: bool) -> None:
        self._by_queue[queue_name] = QueueConsumer(queue_name, on_message, task_queue=task_queue)

    async def attach(self, session: AmqpSession) -> None:
        """Consume on a new session's channel; the old session's consumers went with it."""
        for consumer in self._by_queue.values():
            consumer.deliveries = session.deliveries
            consumer.acks = session.acks
            consumer.tag = None
            await self._apply(consumer)

    async def apply_all(self) -> None:
        """Bring every consumer to its wanted state now (at stop: paused)."""
        for consumer in self._by_queue.values():
            await self._apply(consumer)

    def held_limit_changed(self) -> None:
        # Paused at the held-bytes limit, resumed under half of it.
        log.info(
            "task_consumers_paused" if self.held.over else "task_consumers_resumed",
            held_bytes=self.held.held,
            limit_bytes=self.held.limit_bytes,
        )
        for consumer in self._by_queue.values():
            if consumer.task_queue:
                self._apply_soon(consumer)

    def on_waiting(self, queue_name: str, waiting: int) -> None:
        """Backpressure from the scheduler: stop consuming a queue whose tasks pile up waiting
        for room, so the backlog stays in RabbitMQ; resume when half of them were placed."""
        consumer = self._by_queue.get(queue_name)
        if consumer is None:
            return
        if not consumer.waiting_paused and waiting >= self._max_waiting:
            consumer.waiting_paused = True
        elif consumer.waiting_paused and waiting <= self._max_waiting // 2:
            consumer.waiting_paused = False
        else:
            return
        log.info(
            "consumer_paused" if consumer.waiting_paused else "consumer_resumed",
            queue=queue_name,
            waiting=waiting,
        )
        self._apply_soon(consumer)

    def is_paused(self, queue_name: str) -> bool:
        return self._by_queue[queue_name].tag is None

    async def settled(self) -> None:
        """Wait until every pause and resume asked for so far has been applied."""
        while self._applying:
            await asyncio.wait(set(self._applying))

    def _apply_soon(self, consumer: QueueConsumer) -> None:
        task = asyncio.create_task(self._apply_in_background(consumer))
        self._applying.add(task)
        task.add_done_callback(self._applying.discard)
        self._in_flight.add(task)  # drained at stop like the deliveries
        task.add_done_callback(self._in_flight.discard)

    async def _apply_in_background(self, consumer: QueueConsumer) -> None:
        try:
            await self._apply(consumer)
        except Exception as exc:
            # Its channel went with the connection: the next session applies it again.
            log.warning("consumer_change_failed", queue=consumer.queue_name, error=str(exc))
            log.debug("consumer_change_failed_traceback", exc_info=True)

    async def _apply(self, consumer: QueueConsumer) -> None:
        """Bring the consumer to its wanted state; serialised so the last wish wins."""
        async with consumer.lock:
            if consumer.deliveries is None:
                return
            held_paused = consumer.task_queue and self.held.over
            want_consuming = (
                not consumer.waiting_paused and not held_paused and not self._stopping()
            )
            if want_consuming and consumer.tag is None:
                assert consumer.acks is not None
                consumer.tag = await consumer.deliveries.consume(
                    consumer.queue_name, functools.partial(consumer.callback, acks=consumer.acks)
                )
            elif not want_consuming and consumer.tag is not None:
                tag, consumer.tag = consumer.tag, None
                try:
                    await consumer.deliveries.cancel(tag)
                except Exception as exc:
                    log.warning("consumer_cancel_failed", queue=consumer.queue_name, error=str(exc))
                    log.debug("consumer_cancel_failed_traceback", exc_info=True)
        async with self.changed:
            self.changed.notify_all()
