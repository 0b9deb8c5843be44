"""AMQP in: consume the task and control queues, hand each delivery to its processor, publish
the outcome, and only then acknowledge. The one place that decides ack and requeue."""

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage

from broker.amqp.frames import frame_extras
from broker.amqp.nodes import AmqpNodes, open_on_a_node, reopen_on_a_node
from broker.amqp.outcome_publishing import OutcomePublishing, PublishAbandoned
from broker.amqp.outcomes import OutcomeStore
from broker.amqp.pipelined import Acks, Deliveries
from broker.amqp.publish_stats import PublishStats
from broker.amqp.queue_depths import QueueDepths
from broker.amqp.session import AmqpSession
from broker.amqp.urls import redact
from broker.ops import memory
from broker.ops.shared_read import SharedRead
from broker.tasks.delivery import Delivery
from broker.tasks.held import HeldBytes
from broker.tasks.outcome import Outcome
from broker.tasks.settlement import Settlement
from schemas.topology import CONTROL_QUEUE, DEAD_QUEUE, TASK_TYPES, task_queue

log = structlog.get_logger("swarm.ingress")

RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 10.0
# Bounded: closing a connection that is going away can wait forever.
SESSION_CLOSE_S = 5.0
# Bodies settled since the last trim before an idle daemon trims its heaps again: a trim
# walks every arena, so a trickle of small tasks must not cause one each time it goes idle.
TRIM_AFTER_RELEASED_BYTES = 1024 * 1024
# Progress messages of one task waiting behind the one being sent; past it the oldest goes.
PROGRESS_WAITING = 16

Processor = Callable[[Delivery], Awaitable[Outcome]]

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


@dataclass
class _Consumer:
    """One consumed queue across sessions. `waiting_paused` (the scheduler's backpressure) and,
    for a task queue, the ingress's held-bytes limit are the reasons to pause; it consumes
    only when neither holds. `tag` is the live consumer on the current session's channel."""

    queue_name: str
    callback: Callable[..., None]
    task_queue: bool
    # The current session's consume channel: its consumers, and how it acknowledges
    # (broker/amqp/pipelined.py).
    deliveries: Deliveries | None = None
    acks: Acks | None = None
    tag: str | None = None
    waiting_paused: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Ingress:
    """Consumes, hands each delivery to its processor, publishes the outcome, then acks.

    Owns the connection: when it drops (RabbitMQ restart, network cut), a new session is
    opened with backoff, the topology declared again and every queue consumed again; outcomes
    computed meanwhile wait for it and are published on the new session. Deliveries of the
    old session are redelivered by RabbitMQ and answered from the outcome store.
    """

    def __init__(
        self,
        amqp_url: str | AmqpNodes,
        prefetch: int,
        process_task: Processor,
        process_control: Processor,
        store: OutcomeStore,
        on_settled: Callable[[Outcome], None],
        max_waiting_per_queue: int = 64,
        max_held_bytes: int = 256 * 1024 * 1024,
        return_memory: bool = True,
        refused_reply_retry_s: float = 10.0,
    ) -> None:
        # The node sessions are opened on; after a lost connection, the next node first.
        self.nodes = amqp_url if isinstance(amqp_url, AmqpNodes) else AmqpNodes(amqp_url)
        self._prefetch = prefetch
        self._process_task = process_task
        self._process_control = process_control
        self._store = store
        self._on_settled = on_settled
        self._max_waiting = max_waiting_per_queue
        self.held = HeldBytes(max_held_bytes)
        self._return_memory = return_memory
        self._released_since_trim = 0
        self.depth_reader = QueueDepths()
        self._shared_depths = SharedRead(self._read_depths)
        self._applying: set[asyncio.Task[None]] = set()
        # Notified each time a consumer was brought to its wanted state (paused or resumed).
        self.consumers_changed = asyncio.Condition()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._consumers: dict[str, _Consumer] = {}
        self._session: AmqpSession | None = None
        # Per task whose progress is being sent (by _progress_key): its sender, and the
        # reports waiting behind the one being sent.
        self._progress_sends: dict[int, asyncio.Task[None]] = {}
        self._progress_waiting: dict[int, deque[bytes]] = {}
        self.progress_superseded = 0
        self._ready = asyncio.Event()
        # Refused, cut down, stripped and abandoned publishes, across sessions (metrics).
        self.publish_stats = PublishStats()
        self._outcomes_out = OutcomePublishing(
            self._ready, lambda: self._session, self.publish_stats, refused_reply_retry_s
        )
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        # Deliveries seen, how many RabbitMQ marked redelivered, and sessions opened.
        self.received = 0
        self.redelivered = 0
        self.sessions = 0

    async def start(self) -> None:
        """Open the first session (raising AmqpUnavailable if RabbitMQ is not there), then
        watch it and reconnect whenever it drops."""
        for task_type in TASK_TYPES:
            self._add_consumer(task_queue(task_type), task_type, self._process_task)
        self._add_consumer(CONTROL_QUEUE, None, self._process_control)
        await self._open_session()
        log.info("amqp_connected", node=self.node, nodes=len(self.nodes.urls))
        self._supervisor = asyncio.create_task(self._supervise())

    def _add_consumer(self, queue_name: str, task_type: str | None, process: Processor) -> None:
        def on_message(message: AbstractIncomingMessage, acks: Acks) -> None:
            delivery = to_delivery(message, queue_name, task_type, acks)
            self.received += 1
            self.redelivered += delivery.redelivered
            size = len(message.body)
            if self.held.hold(size):
                self._held_limit_changed()
            task = asyncio.create_task(self._handle(delivery, process))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
            # _handle ends once the delivery is settled (or handed back): its body is let go.
            task.add_done_callback(lambda _: self._release(size))

        self._consumers[queue_name] = _Consumer(
            queue_name, on_message, task_queue=task_type is not None
        )

    def _release(self, size: int) -> None:
        if self.held.release(size):
            self._held_limit_changed()
        self._released_since_trim += size
        if self.held.held == 0 and self._released_since_trim >= TRIM_AFTER_RELEASED_BYTES:
            # Idle after large deliveries: give the heaps' free pages back, off the loop.
            self._released_since_trim = 0
            if self._return_memory:
                self._background(self._trim())

    async def _trim(self) -> None:
        returned = await asyncio.to_thread(memory.trim)
        log.info(
            "heaps_trimmed",
            returned=returned,
            released_bytes_total=self.held.released_total,
        )

    def _held_limit_changed(self) -> None:
        # Paused at the held-bytes limit, resumed under half of it.
        log.info(
            "task_consumers_paused" if self.held.over else "task_consumers_resumed",
            held_bytes=self.held.held,
            limit_bytes=self.held.limit_bytes,
        )
        for consumer in self._consumers.values():
            if consumer.task_queue:
                self._apply_soon(consumer)

    def _apply_soon(self, consumer: _Consumer) -> None:
        task = asyncio.create_task(self._apply_in_background(consumer))
        self._applying.add(task)
        task.add_done_callback(self._applying.discard)
        self._in_flight.add(task)  # drained at stop like the deliveries
        task.add_done_callback(self._in_flight.discard)

    async def _apply_in_background(self, consumer: _Consumer) -> None:
        try:
            await self._apply(consumer)
        except Exception as exc:
            # Its channel went with the connection: the next session applies it again.
            log.warning("consumer_change_failed", queue=consumer.queue_name, error=str(exc))
            log.debug("consumer_change_failed_traceback", exc_info=True)

    async def consumers_settled(self) -> None:
        """Wait until every pause and resume asked for so far has been applied."""
        while self._applying:
            await asyncio.wait(set(self._applying))

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._in_flight.add(task)  # drained at stop like the deliveries
        task.add_done_callback(self._in_flight.discard)

    async def _open_session(self) -> None:
        """Open a session on the first node of a round that takes one (broker/amqp/nodes.py);
        raises when none did."""
        await open_on_a_node(self.nodes, self._open_session_on, self._node_failed)

    @staticmethod
    def _node_failed(url: str, exc: Exception) -> None:
        log.warning(
            "amqp_node_unavailable",
            node=redact(url),
            error=f"{type(exc).__name__}: {exc}".rstrip(": "),
        )
        log.debug("amqp_node_unavailable_traceback", exc_info=exc)

    async def _open_session_on(self, url: str) -> None:
        """Open a session on one node, replay the outcome store on it, consume; a session that
        fails on the way is closed (with the store's stream consumer on it), never left
        behind."""
        session = await AmqpSession.open(url, self._prefetch)
        try:
            await self._store.attach(
                session.connection, session.publish_channel, on_lost=session.lost.set
            )
            self._session = session
            self.sessions += 1
            for consumer in self._consumers.values():
                consumer.deliveries = session.deliveries
                consumer.acks = session.acks
                consumer.tag = None
                await self._apply(consumer)
        except BaseException:
            await self._store.detach()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.close(), SESSION_CLOSE_S)
            raise
        self._ready.set()

    async def _supervise(self) -> None:
        while not self._stopping:
            assert self._session is not None
            await self._session.lost.wait()
            if self._stopping:
                return
            self._ready.clear()
            log.warning("connection_lost", node=self.node)
            self.nodes.lost()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._session.close(), SESSION_CLOSE_S)
            reopened = await reopen_on_a_node(
                self.nodes,
                self._open_session_on,
                self._node_failed,
                first_s=RECONNECT_FIRST_S,
                max_s=RECONNECT_MAX_S,
                stopped=lambda: self._stopping,
                on_round_failed=_reconnect_failed,
            )
            if reopened:
                log.info("reconnected", node=self.node, sessions=self.sessions)

    @property
    def node(self) -> str | None:
        """The RabbitMQ node connected to, password masked; None while reconnecting."""
        in_use = self.nodes.in_use
        return redact(in_use) if in_use is not None else None

    @property
    def consuming(self) -> bool:
        """Connected, and taking deliveries (not shutting down)."""
        return self._ready.is_set() and not self._stopping

    def on_waiting(self, queue_name: str, waiting: int) -> None:
        """Backpressure from the scheduler: stop consuming a queue whose tasks pile up waiting
        for room, so the backlog stays in RabbitMQ; resume when half of them were placed."""
        consumer = self._consumers.get(queue_name)
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
        return self._consumers[queue_name].tag is None

    async def _apply(self, consumer: _Consumer) -> None:
        """Bring the consumer to its wanted state; serialised so the last wish wins."""
        async with consumer.lock:
            if consumer.deliveries is None:
                return
            held_paused = consumer.task_queue and self.held.over
            want_consuming = not consumer.waiting_paused and not held_paused and not self._stopping
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
        async with self.consumers_changed:
            self.consumers_changed.notify_all()

    async def _handle(self, delivery: Delivery, process: Processor) -> None:
        # Every line logged while the delivery is processed and settled carries its queue, and
        # once its outcome names one, its task id (the processor binds it earlier, around the
        # run of an admitted task); tasks started meanwhile inherit both.
        structlog.contextvars.bind_contextvars(queue=delivery.queue)
        try:
            await self._process_and_settle(delivery, process)
        finally:
            structlog.contextvars.unbind_contextvars("queue", "task_id")

    async def _process_and_settle(self, delivery: Delivery, process: Processor) -> None:
        assert delivery.settle_token is not None
        settlement = delivery.settle_token
        outcome: Outcome | None = None
        try:
            outcome = await process(delivery)
            if outcome.task_id is not None:
                structlog.contextvars.bind_contextvars(task_id=outcome.task_id)
            record = None
            if outcome.recorded:
                assert outcome.task_id is not None
                record = self._store.outcome_record(
                    outcome.task_id, outcome.status, outcome.reply_body
                )
            if outcome.reply:
                await self._progress_sent(delivery)
                await self._publish(delivery, outcome, record)
            if record is not None:
                self._store.apply(record)
        except asyncio.CancelledError:
            # Shutting down: hand the task back to RabbitMQ for another daemon.
            await settlement.requeue()
            raise
        except PublishAbandoned:
            # Logged once where it was given up (`publish_abandoned`): back to the queue.
            await settlement.requeue()
            return
        except Exception:
            # Unexpected (a bug): the traceback goes with the line.
            log.exception("delivery_failed", action="requeued", message_id=delivery.message_id)
            await settlement.requeue()
            return
        finally:
            if outcome is not None:
                self._on_settled(outcome)
        if not outcome.settle:
            # Held by the task running here (a renewal copy or redelivery of it), which settles
            # it; its body was let go when it was handed over, so held memory is what `held`
            # says.
            return
        await settlement.ack()

    async def _publish(self, delivery: Delivery, outcome: Outcome, record: bytes | None) -> None:
        """Publish on the current session, and on the next ones if connections drop under
        it, within the limits and order of broker/amqp/outcome_publishing.py (a reply may then
        arrive twice, with the same body). Raises PublishAbandoned past those limits."""
        await self._outcomes_out.publish(delivery, outcome, record)

    def publish_progress(self, delivery: Delivery, body: bytes) -> None:
        """Send a progress message in the background; one lost with a connection is not
        sent again (the final reply is what is guaranteed, and goes after them).

        Per task, one message is in flight and at most PROGRESS_WAITING wait, in order; past
        that the oldest waiting one is dropped (counted in `progress_superseded`), so a
        handler reporting faster than they leave costs one send task and a bounded number of
        bodies, not one of each per report. The `seq` of the messages sent shows the gap."""
        session = self._session
        if session is None or session.lost.is_set():
            return
        key = _progress_key(delivery)
        waiting = self._progress_waiting.get(key)
        if waiting is not None:
            if len(waiting) >= PROGRESS_WAITING:
                waiting.popleft()
                self.progress_superseded += 1
            waiting.append(body)
            return
        self._progress_waiting[key] = deque([body])
        self._progress_sends[key] = asyncio.ensure_future(self._send_progress(key, delivery))

    async def _send_progress(self, key: int, delivery: Delivery) -> None:
        waiting = self._progress_waiting[key]
        try:
            while waiting:
                body = waiting.popleft()
                session = self._session
                if session is None or session.lost.is_set():
                    return
                try:
                    await session.publisher.publish_progress(delivery, body)
                except Exception as exc:
                    log.debug("progress_not_sent", error=str(exc), exc_info=True)
        finally:
            del self._progress_waiting[key]
            del self._progress_sends[key]

    async def _progress_sent(self, delivery: Delivery) -> None:
        """Until the task's progress messages are out: its reply goes after them."""
        sender = self._progress_sends.get(_progress_key(delivery))
        if sender is not None:
            await asyncio.wait({sender})

    async def renew(self, delivery: Delivery, lease: str) -> None:
        """Put a renewal copy of a long task's message on its queue (confirmed)."""
        await self._ready.wait()
        assert self._session is not None
        await self._session.publisher.republish(delivery, lease)

    async def queue_depths(self) -> dict[str, int]:
        """Messages ready per consumed queue and in the dead-letter queue. Concurrent callers
        (status requests, the metrics refresh) share one read, on one channel per session."""
        return dict(await self._shared_depths())  # a copy: the read is shared

    async def _read_depths(self) -> dict[str, int]:
        await self._ready.wait()
        assert self._session is not None
        names = [*self._consumers, DEAD_QUEUE]
        return await self.depth_reader.read(self._session.connection, names)

    async def stop_consuming(self) -> None:
        """Stop taking new deliveries; those in flight go on."""
        self._stopping = True
        if self._session is not None and not self._session.lost.is_set():
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

    async def close(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        await self._store.detach()
        if self._session is not None:
            await self._session.close()


def _reconnect_failed(exc: Exception, retry_in_s: float) -> None:
    log.warning(
        "reconnect_failed",
        error=f"{type(exc).__name__}: {exc}".rstrip(": "),
        retry_in_s=retry_in_s,
    )
    log.debug("reconnect_failed_traceback", exc_info=exc)


def _progress_key(delivery: Delivery) -> int:
    """One per delivery while it is processed: its settlement (the processor may hand on a
    copy of the Delivery with its lease read, never another settlement)."""
    token = delivery.settle_token
    return id(token) if token is not None else id(delivery)


class AmqpSettlement(Settlement):
    """Acknowledges or requeues one delivery through its channel's `Acks` (one multiple ack per loop
    turn, broker/amqp/pipelined.py); broker/tasks/settlement.py decides which calls are legal (a
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
