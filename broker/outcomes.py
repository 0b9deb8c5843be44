"""The outcome store: one outcome per task id, kept for the retention window, across restarts.

Backed by a RabbitMQ stream, `swarm.outcomes`: every final reply (and every cancel of a task
not seen yet) is appended there, confirmed before the task is acknowledged. A daemon starting,
or a standby taking over, replays the stream into an in-memory index and then tails it, so
every daemon answers a duplicate from the same history.

Why a stream rather than Ray's key-value store or a detached actor: the store must outlive the
daemon *and* the Ray cluster (an embedded Ray dies with its daemon), be shared with a standby
daemon without a second system to run, and expire by age. A stream does all three; RabbitMQ
replicates it like the task queues; `x-max-age` trims it, and the index checks the exact
window itself (streams trim by whole segments).
"""

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from schemas.codec import decode, encode

log = structlog.get_logger("swarm.outcomes")

OUTCOMES_QUEUE = "swarm.outcomes"
# Small segments so that age-based trimming follows the retention window closely.
SEGMENT_BYTES = 8 * 1024 * 1024


def stream_arguments(retention_s: float) -> dict[str, Any]:
    return {
        "x-queue-type": "stream",
        "x-max-age": f"{max(1, int(retention_s))}s",
        "x-stream-max-segment-size-bytes": SEGMENT_BYTES,
    }


@dataclass(frozen=True)
class StoredOutcome:
    status: str
    reply_body: bytes
    recorded_at_s: float


class OutcomeStore:
    """The index of final outcomes and remembered cancels, fed by the stream."""

    def __init__(self, retention_s: float, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self._bytes = 0
        self.evicted = 0
        # Insertion order is recording order: the oldest outcome is always first.
        self._outcomes: dict[str, StoredOutcome] = {}
        self._cancels: dict[str, float] = {}
        self._append: Callable[[bytes], Awaitable[None]] | None = None
        self._consumer: tuple[AbstractChannel, str] | None = None

    # -- lookups -----------------------------------------------------------------------------
    def get(self, task_id: str) -> StoredOutcome | None:
        stored = self._outcomes.get(task_id)
        if stored is not None and self._expired(stored.recorded_at_s):
            self._forget(task_id)
            return None
        return stored

    def cancel_pending(self, task_id: str) -> bool:
        """True when a cancel arrived for this id before the task did (within retention)."""
        at = self._cancels.get(task_id)
        if at is not None and self._expired(at):
            del self._cancels[task_id]
            return False
        return at is not None

    def _expired(self, at_s: float) -> bool:
        return time.time() - at_s > self.retention_s

    def sweep(self) -> int:
        """Forget entries older than the window; returns how many went."""
        before = len(self._outcomes) + len(self._cancels)
        cutoff = time.time() - self.retention_s
        for task_id in [k for k, v in self._outcomes.items() if v.recorded_at_s < cutoff]:
            self._forget(task_id)
        self._cancels = {k: v for k, v in self._cancels.items() if v >= cutoff}
        return before - len(self._outcomes) - len(self._cancels)

    def _remember(self, task_id: str, stored: StoredOutcome) -> None:
        """Index an outcome; past `max_bytes` of reply bodies the oldest are forgotten first,
        so memory stays bounded whatever the replies weigh (a duplicate of a forgotten
        outcome runs again, as one older than the retention window would)."""
        self._outcomes[task_id] = stored
        self._bytes += len(stored.reply_body)
        while self._bytes > self.max_bytes and self._outcomes:
            self._forget(next(iter(self._outcomes)))
            self.evicted += 1

    def _forget(self, task_id: str) -> None:
        stored = self._outcomes.pop(task_id, None)
        if stored is not None:
            self._bytes -= len(stored.reply_body)

    @property
    def memory_bytes(self) -> int:
        return self._bytes

    # -- writes ------------------------------------------------------------------------------
    @staticmethod
    def batch_record(records: list[bytes]) -> bytes:
        """Several records as one stream message (see publisher.RecordBatcher)."""
        return encode({"k": "batch", "items": records})

    def outcome_record(self, task_id: str, status: str, reply_body: bytes) -> bytes:
        """The stream record of a final outcome; `apply` it once RabbitMQ confirmed it."""
        return encode(
            {"k": "outcome", "id": task_id, "s": status, "r": reply_body, "t": time.time()}
        )

    async def remember_cancel(self, task_id: str) -> None:
        record = encode({"k": "cancel", "id": task_id, "t": time.time()})
        await self._write(record)
        self.apply(record)

    async def _write(self, record: bytes) -> None:
        if self._append is None:
            raise RuntimeError("the outcome store is not attached to RabbitMQ")
        await self._append(record)

    def apply(self, record: bytes) -> None:
        """Fold one stream record into the index (idempotent: replays and tails repeat)."""
        try:
            entry = decode(record)
            if entry["k"] == "batch":
                for item in entry["items"]:
                    self.apply(item)
                return
            kind, task_id, at = entry["k"], str(entry["id"]), float(entry["t"])
        except Exception:
            log.warning("unreadable record in the outcome stream; skipped")
            return
        if self._expired(at):
            return
        if kind == "outcome":
            if task_id not in self._outcomes:
                self._remember(task_id, StoredOutcome(str(entry["s"]), entry["r"], at))
            self._cancels.pop(task_id, None)
        elif kind == "cancel" and task_id not in self._outcomes:
            self._cancels[task_id] = at

    # -- the stream --------------------------------------------------------------------------
    async def attach(
        self, connection: AbstractConnection, publish_channel: AbstractChannel
    ) -> None:
        """Declare the stream, replay it up to now, then keep tailing it."""
        await publish_channel.declare_queue(
            OUTCOMES_QUEUE, durable=True, arguments=stream_arguments(self.retention_s)
        )

        async def append(record: bytes) -> None:
            await publish_channel.default_exchange.publish(
                aio_pika.Message(record, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                OUTCOMES_QUEUE,
            )

        self._append = append
        # Replay: append a marker, then read from the first record until the marker shows up.
        marker = f"replay-{uuid.uuid4().hex}"
        caught_up = asyncio.Event()
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.get_queue(OUTCOMES_QUEUE, ensure=False)

        async def on_record(message: AbstractIncomingMessage) -> None:
            if message.body.startswith(b"marker:"):
                if message.body == f"marker:{marker}".encode():
                    caught_up.set()
            else:
                self.apply(message.body)
            await message.ack()

        tag = await queue.consume(on_record, arguments={"x-stream-offset": "first"})
        self._consumer = (channel, tag)
        await publish_channel.default_exchange.publish(
            aio_pika.Message(f"marker:{marker}".encode()), OUTCOMES_QUEUE
        )
        await asyncio.wait_for(caught_up.wait(), 120)
        log.info(
            "outcome store replayed",
            outcomes=len(self._outcomes),
            cancels=len(self._cancels),
            retention_s=self.retention_s,
        )

    async def detach(self) -> None:
        if self._consumer is not None:
            channel, _ = self._consumer
            self._consumer = None
            await channel.close()
        self._append = None
