"""The daemon's receive path in memory: deliveries, settlements, the outcome store, and the
whole chain from a queued message to its settlement, wired as broker/daemon.py wires it.

Three levels, smallest first:
- `RecordingSettlement` and `delivery(...)`: a Delivery with a settlement that records what
  the code under test did with it (the Delivery/Settlement seam of broker/tasks/delivery.py), for
  driving TaskProcessor.process directly.
- `MemoryOutcomeStore`: the real OutcomeStore, its stream the memory broker's (it replays
  what earlier sessions or other daemons appended, as the real one replays swarm.outcomes).
- `MemorySwarm`: the real Ingress, TaskProcessor, ControlProcessor, Scheduler and Ledger on
  a MemoryBroker and FakePools: what runs in the daemon between RabbitMQ and Ray.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from broker.amqp.ingress import Ingress
from broker.amqp.outcomes import OUTCOMES_QUEUE, OutcomeStore
from broker.ops.control import ControlProcessor
from broker.scheduling.ledger import Ledger
from broker.scheduling.pools import PoolSet
from broker.scheduling.scheduler import Scheduler
from broker.settings import Settings
from broker.tasks.delivery import Delivery, Settlement
from broker.tasks.outcome import Outcome
from broker.tasks.processor import TaskProcessor
from schemas.codec import decode, encode
from schemas.topology import CONTENT_TYPE, CONTROL_QUEUE, DEAD_EXCHANGE, TASK_TYPES, task_queue
from workers.cluster import NodeInfo
from workers.registry import HandlerRegistry, load_handlers
from workers.resources import ResourceVector

from .pools import ASYNC, HANDLERS, FakePools
from .server import MemoryBroker, Message, Published
from .sync import Changes

REPLY_QUEUE = "replies"
NODE = NodeInfo("n1", True, "127.0.0.1", ResourceVector(cpus=64.0, memory_mb=65536))


def quick_settings(**overrides: Any) -> Settings:
    """Settings for in-memory runs: retries back off for a millisecond, leases are renewed
    only when a test asks for it; everything a test relies on is given, so SWARM_*
    variables in the environment cannot change it."""
    values: dict[str, Any] = {
        "handler_modules": [],
        "retry_backoff_s": 0.001,
        "default_max_retries": 3,
        "retry_timeouts": False,
        "lease_renew_s": 600.0,
        "lease_secret": None,
        "drain_timeout_s": 1.0,
        "outcome_retention_s": 3600.0,
        "outcome_memory_mb": 16,
        "outcome_max_reply_mb": 8,
        "max_waiting_per_queue": 64,
        "max_held_mb": 256,
        "prefetch": 64,
        "defaults_data_processing": {"cpus": 1.0, "gpus": 0.0, "memory_mb": 0},
    }
    values.update(overrides)
    return Settings(**values)


def task_body(task_id: str, handler: str = ASYNC.name, **fields: Any) -> bytes:
    """A task message body (msgpack), of type data_processing unless told otherwise."""
    body = {"v": 1, "id": task_id, "type": "data_processing", "handler": handler, **fields}
    return encode(body)


class RecordingSettlement:
    """A delivery's settlement (broker/tasks/delivery.py) that records what RabbitMQ is told of it,
    in `calls`: "ack" or "requeue", in order. `settled` is the first: the one that counts.

    Also answers `renewed()` (acknowledged early, its renewal copy queued: an ack on the
    wire) and `hold()` (kept by the task running here: nothing on the wire), which the
    processor calls where the settlement is a state machine (broker/tasks/settlement.py)."""

    def __init__(self, changes: Changes | None = None) -> None:
        self.calls: list[str] = []
        self.held = False
        self._changes = changes

    async def ack(self) -> None:
        self._record("ack")

    async def requeue(self) -> None:
        self._record("requeue")

    async def renewed(self) -> None:
        self._record("ack")

    def hold(self) -> None:
        self.held = True

    def _record(self, call: str) -> None:
        self.calls.append(call)
        if self._changes is not None:
            self._changes.notify()

    @property
    def settled(self) -> str | None:
        return self.calls[0] if self.calls else None


def delivery(
    body: bytes,
    *,
    task_type: str = "data_processing",
    reply_to: str | None = REPLY_QUEUE,
    headers: dict[str, Any] | None = None,
    redelivered: bool = False,
    settlement: RecordingSettlement | None = None,
    **properties: Any,
) -> Delivery:
    """A Delivery of `body` on its task type's queue, as the ingress would make it."""
    return Delivery(
        body=body,
        queue=task_queue(task_type),
        task_type=task_type,
        properties={
            "content_type": CONTENT_TYPE,
            "reply_to": reply_to,
            "headers": headers,
            **properties,
        },
        redelivered=redelivered,
        received_at_s=time.monotonic(),
        # A Settlement by its calls; nominally one only where Settlement is a Protocol.
        settle_token=cast("Settlement | None", settlement),
    )


class MemoryOutcomeStore(OutcomeStore):
    """The real outcome index; `attach` replays the memory broker's stream from where this
    store stopped (records other daemons appended meanwhile), then appends to it through the
    session's publish channel, as OutcomeStore.attach does with swarm.outcomes."""

    def __init__(self, broker: MemoryBroker, retention_s: float, **limits: Any) -> None:
        super().__init__(retention_s, **limits)
        self._broker = broker
        self._replayed = 0
        self.attached = 0

    async def attach(
        self,
        connection: AbstractConnection,
        publish_channel: AbstractChannel,
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        for record in self._broker.stream[self._replayed :]:
            self.apply(record)
        self._replayed = len(self._broker.stream)

        async def append(record: bytes) -> None:
            await publish_channel.default_exchange.publish(
                aio_pika.Message(record, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                OUTCOMES_QUEUE,
            )

        self._append = append
        self.attached += 1

    async def detach(self) -> None:
        self._append = None


class MemorySwarm:
    """One daemon's Ingress, processors, scheduler and ledger on a MemoryBroker and
    FakePools. Tasks are sent with `send` (a message on the task type's queue) and answered
    by the test through `pools`; replies land in the `replies` queue, dead letters are the
    broker's publishes to swarm.dead, records its `stream`."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        *,
        settings: Settings | None = None,
        changes: Changes | None = None,
        broker: MemoryBroker | None = None,
        actors: int = 1,
        max_held_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.changes = changes or (broker.changes if broker is not None else Changes())
        self.broker = broker or MemoryBroker(
            self.changes, [*(task_queue(t) for t in TASK_TYPES), CONTROL_QUEUE, REPLY_QUEUE]
        )
        self.broker.install(monkeypatch)
        self.settings = settings or quick_settings()
        ledger = Ledger()
        ledger.set_nodes([NODE])
        self.scheduler = Scheduler(ledger)
        self.pools = FakePools(self.scheduler, self.changes, actors=actors)
        self.store = MemoryOutcomeStore(
            self.broker,
            self.settings.outcome_retention_s,
            max_bytes=self.settings.outcome_memory_mb * 1024 * 1024,
            max_reply_bytes=self.settings.outcome_max_reply_mb * 1024 * 1024,
        )
        self.registry: HandlerRegistry = load_handlers([])
        for handler in HANDLERS:
            self.registry.add(handler)
        pools = cast(PoolSet, self.pools)
        self.processor = TaskProcessor(
            self.settings, self.registry, self.scheduler, pools, self.store
        )
        self.control = ControlProcessor(
            self.settings, self.scheduler, pools, self._no_depths, self.processor, self.store
        )
        # What the ingress calls for each task delivery; a test may put something in between.
        self.process_task: Callable[[Delivery], Awaitable[Outcome]] = self.processor.process
        self.outcomes: list[Outcome] = []  # every outcome settled, in order
        self.ingress = Ingress(
            "amqp://memory/",
            self.settings.prefetch,
            self._process_task,
            self.control.process,
            self.store,
            self._settled,
            self.settings.max_waiting_per_queue,
            max_held_bytes,
            return_memory=False,
        )
        self.scheduler.on_tag_waiting = self.ingress.on_waiting
        self.processor.renew = self.ingress.renew
        self.processor.publish_progress = self.ingress.publish_progress
        self._started = False
        self._processing: list[asyncio.Task[Outcome]] = []

    async def _no_depths(self) -> dict[str, int]:
        return {}

    async def _process_task(self, delivery: Delivery) -> Outcome:
        return await self.process_task(delivery)

    def _settled(self, outcome: Outcome) -> None:
        self.processor.settled(outcome)
        self.outcomes.append(outcome)
        self.changes.notify()

    async def start(self) -> None:
        await self.ingress.start()
        self._started = True

    async def stop(self, drain_timeout_s: float = 1.0) -> int:
        """As Daemon.stop: stop consuming, drain, close. Returns how many were requeued."""
        self._started = False
        await self.ingress.stop_consuming()
        requeued = await self.ingress.drain(drain_timeout_s)
        await self.ingress.close()
        return requeued

    def process(self, delivery: Delivery) -> "asyncio.Task[Outcome]":
        """TaskProcessor.process on `delivery`, in a task of its own (no ingress)."""
        task = asyncio.create_task(self.processor.process(delivery))
        self._processing.append(task)
        return task

    async def close(self) -> None:
        """The end of a test, passed or failed: runs left unanswered and processing still
        going are cancelled, and the ingress is stopped if it still runs, so nothing is left
        behind on the event loop the tests share."""
        for call in self.pools.calls:
            if not call.answer.done():
                call.answer.cancel()
        for task in self._processing:
            task.cancel()
        await asyncio.gather(*self._processing, return_exceptions=True)
        if self._started:
            await self.stop(drain_timeout_s=0.0)

    # -- the producer's side -----------------------------------------------------------------
    def send(
        self,
        body: bytes,
        *,
        task_type: str = "data_processing",
        reply_to: str | None = REPLY_QUEUE,
        headers: dict[str, Any] | None = None,
        **properties: Any,
    ) -> Message:
        """Put a task message on its queue, as a producer's publish would."""
        values = {
            "content_type": CONTENT_TYPE,
            "delivery_mode": 2,
            "reply_to": reply_to,
            "headers": headers,
            **properties,
        }
        return self.broker.queue(task_queue(task_type)).put(Message(body, values))

    def replies(self, queue: str = REPLY_QUEUE) -> list[dict[str, Any]]:
        """Every reply that reached `queue`, decoded, in order."""
        return [decode(message.body) for message in self.broker.queue(queue).delivered]

    def dead_letters(self) -> list[Published]:
        return self.broker.to(exchange=DEAD_EXCHANGE)

    async def until(self, predicate: Callable[[], bool], what: str = "the condition") -> None:
        await self.changes.until(predicate, what)

    async def settled(self, *messages: Message) -> None:
        """Until each message was acked or handed back to its queue."""
        await self.until(lambda: all(m.settled for m in messages), "the messages to settle")
