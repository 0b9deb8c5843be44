"""AMQP in: consume the task and control queues, hand each delivery to its processor, publish
the outcome, and only then acknowledge.

`Ingress` is the facade the daemon (and the tests) use. It owns the connection: the session it
opens on one node of the cluster, and its supervision, which opens the next one when it drops.
The rest lives beside it, one concept per module:

- broker/amqp/consumers.py: which queues are consumed, paused for backpressure or held bytes;
- broker/amqp/incoming.py: a message as a `Delivery` and its `AmqpSettlement`;
- broker/amqp/settling.py: process, publish, then ack or requeue (the one place that decides);
- broker/amqp/progress.py: progress messages, bounded per task, sent before the reply;
- broker/amqp/outcome_publishing.py: an outcome's publishes across sessions.
"""

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage

from broker.amqp.acks import Acks
from broker.amqp.consumers import Consumers
from broker.amqp.incoming import to_delivery
from broker.amqp.nodes import AmqpNodes, open_on_a_node, reopen_on_a_node
from broker.amqp.outcome_publishing import OutcomePublishing
from broker.amqp.outcomes import OutcomeStore
from broker.amqp.progress import ProgressSender
from broker.amqp.publish_stats import PublishStats
from broker.amqp.queue_depths import QueueDepths
from broker.amqp.session import AmqpSession
from broker.amqp.settling import Processor, handle
from broker.amqp.urls import redact
from broker.ops import memory
from broker.ops.shared_read import SharedRead
from broker.tasks.delivery import Delivery
from broker.tasks.held import HeldBytes
from broker.tasks.outcome import Outcome
from schemas.topology import CONTROL_QUEUE, DEAD_QUEUE, TASK_TYPES, task_queue

log = structlog.get_logger("swarm.ingress")

RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 10.0
# Bounded: closing a connection that is going away can wait forever.
SESSION_CLOSE_S = 5.0
# Bodies settled since the last trim before an idle daemon trims its heaps again: a trim
# walks every arena, so a trickle of small tasks must not cause one each time it goes idle.
TRIM_AFTER_RELEASED_BYTES = 1024 * 1024


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
        self.held = HeldBytes(max_held_bytes)
        self._return_memory = return_memory
        self._released_since_trim = 0
        self.depth_reader = QueueDepths()
        self._shared_depths = SharedRead(self._read_depths)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._consumers = Consumers(
            self.held, max_waiting_per_queue, self._in_flight, lambda: self._stopping
        )
        # Notified each time a consumer was brought to its wanted state (paused or resumed).
        self.consumers_changed = self._consumers.changed
        self._session: AmqpSession | None = None
        # Read through a function: the current session, whichever it is when a report goes.
        self._progress = ProgressSender(lambda: self._session)
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
                self._consumers.held_limit_changed()
            task = asyncio.create_task(self._handle(delivery, process))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
            # _handle ends once the delivery is settled (or handed back): its body is let go.
            task.add_done_callback(lambda _: self._release(size))

        self._consumers.add(queue_name, on_message, task_queue=task_type is not None)

    def _release(self, size: int) -> None:
        if self.held.release(size):
            self._consumers.held_limit_changed()
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

    async def consumers_settled(self) -> None:
        """Wait until every pause and resume asked for so far has been applied."""
        await self._consumers.settled()

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
            await self._consumers.attach(session)
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
        self._consumers.on_waiting(queue_name, waiting)

    def is_paused(self, queue_name: str) -> bool:
        return self._consumers.is_paused(queue_name)

    async def _handle(self, delivery: Delivery, process: Processor) -> None:
        await handle(
            delivery,
            process,
            store=self._store,
            progress_sent=self._progress.sent,
            publish=self._publish,
            on_settled=self._on_settled,
        )

    async def _publish(self, delivery: Delivery, outcome: Outcome, record: bytes | None) -> None:
        """Publish on the current session, and on the next ones if connections drop under
        it, within the limits and order of broker/amqp/outcome_publishing.py (a reply may then
        arrive twice, with the same body). Raises PublishAbandoned past those limits."""
        await self._outcomes_out.publish(delivery, outcome, record)

    def publish_progress(self, delivery: Delivery, body: bytes) -> None:
        """Send a progress message in the background, bounded per task
        (broker/amqp/progress.py); its reply goes after it."""
        self._progress.publish(delivery, body)

    @property
    def progress_superseded(self) -> int:
        """Progress messages dropped because newer ones of their task were waiting."""
        return self._progress.superseded

    @property
    def _progress_sends(self) -> dict[int, asyncio.Task[None]]:
        # The send task per task whose progress is going out (tests wait for them).
        return self._progress.sends

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
        names = [*self._consumers.queue_names, DEAD_QUEUE]
        return await self.depth_reader.read(self._session.connection, names)

    async def stop_consuming(self) -> None:
        """Stop taking new deliveries; those in flight go on."""
        self._stopping = True
        if self._session is not None and not self._session.lost.is_set():
            await self._consumers.apply_all()

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
