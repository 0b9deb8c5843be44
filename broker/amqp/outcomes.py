"""The outcome store: one outcome per task id, kept for the retention window, across restarts.

Backed by a RabbitMQ stream, `swarm.outcomes`: every final reply (and every cancel of a task
not seen yet) is appended there, confirmed before the task is acknowledged. A daemon starting,
or a standby taking over, replays the stream into an in-memory index and then tails it, so
every daemon answers a duplicate from the same history (broker/amqp/outcome_replay.py reads it).

Why a stream rather than Ray's key-value store or a detached actor: the store must outlive the
daemon *and* the Ray cluster (an embedded Ray dies with its daemon), be shared with a standby
daemon without a second system to run, and expire by age. A stream does all three; RabbitMQ
replicates it like the task queues; `x-max-age` trims it, and the index checks the exact
window itself (streams trim by whole segments).

Sizes: a reply of at most `max_reply_bytes` is recorded (and so answers its duplicates); a
larger one is answered but not remembered, and a duplicate of its id runs again. Records are
read back whatever their size up to RabbitMQ's own ceiling on a message, so that no record the
stream accepted is ever skipped for its size.
"""

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from broker.amqp.outcome_replay import OUTCOMES_QUEUE, REPLAY_STALL_S, StreamReader
from broker.lazy_logging import LazyLogger
from schemas.codec import CodecLimits, decode, encode

__all__ = ["OUTCOMES_QUEUE", "OutcomeStore", "StoredOutcome", "stream_arguments"]

log = LazyLogger("swarm.outcomes")

MIB = 1024 * 1024
# Small segments so that age-based trimming follows the retention window closely.
SEGMENT_BYTES = 8 * MIB
# Largest reply recorded unless told otherwise (SWARM_OUTCOME_MAX_REPLY_MB).
DEFAULT_MAX_REPLY_BYTES = 32 * MIB
# Reading records back: up to 512 MiB, the most RabbitMQ's `max_message_size` can be set to,
# so whatever RabbitMQ took into the stream (one record, or a batch of them) is read back. Not
# the task-body limit: a reply may be larger than any task. A record is a map of scalars, a
# batch a map holding a list of records as bytes: a handful of containers, never deeper.
RECORD_LIMITS = CodecLimits(max_body_bytes=512 * MIB, max_depth=4, max_containers=64)


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

    def __init__(
        self,
        retention_s: float,
        max_bytes: int = 256 * MIB,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
        replay_stall_s: float = REPLAY_STALL_S,
    ) -> None:
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        # A reply larger than the index holds would only push every other outcome out.
        self.max_reply_bytes = min(max_reply_bytes, max_bytes)
        self._bytes = 0
        self.evicted = 0
        # Final outcomes answered but not recorded, their reply over `max_reply_bytes`.
        self.unrecorded = 0
        # Insertion order is recording order: the oldest outcome is always first.
        self._outcomes: dict[str, StoredOutcome] = {}
        self._cancels: dict[str, float] = {}
        self._append: Callable[[bytes], Awaitable[None]] | None = None
        self._reader = StreamReader(self.apply, replay_stall_s)

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
        if len(stored.reply_body) > self.max_bytes:
            # Only from a daemon with a larger limit: kept, it would push out everything else.
            return
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

    @property
    def replay(self) -> StreamReader:
        """The stream reader: its `stats`, `next_offset` and `wait_until`."""
        return self._reader

    # -- writes ------------------------------------------------------------------------------
    @staticmethod
    def batch_record(records: list[bytes]) -> bytes:
        """Several records as one stream message (see publisher.RecordBatcher)."""
        return encode({"k": "batch", "items": records})

    def outcome_record(self, task_id: str, status: str, reply_body: bytes) -> bytes | None:
        """The stream record of a final outcome; `apply` it once RabbitMQ confirmed it.

        None when the reply is larger than `max_reply_bytes`: that outcome is answered but
        not remembered, so a duplicate of the id runs again (as after the retention window)."""
        if len(reply_body) > self.max_reply_bytes:
            self.unrecorded += 1
            # A duplicate of this id will run again.
            log.warning(
                "outcome_not_recorded",
                reason="reply_too_large",
                task_id=task_id,
                reply_bytes=len(reply_body),
                max_reply_bytes=self.max_reply_bytes,
            )
            return None
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
            entry = decode(record, RECORD_LIMITS)
            if entry["k"] == "batch":
                for item in entry["items"]:
                    self.apply(item)
                return
            kind, task_id, at = entry["k"], entry["id"], entry["t"]
            # Anyone who may publish to the stream can write a record: take none on trust.
            if not (isinstance(task_id, str) and isinstance(at, int | float)):
                raise ValueError("a record needs a str id and a number t")
            at = float(at)
            if not math.isfinite(at):
                raise ValueError(f"t is {at}")
            if kind == "outcome" and not (
                isinstance(entry["s"], str) and isinstance(entry["r"], bytes)
            ):
                raise ValueError("an outcome record needs a str s and bytes r")
        except Exception as exc:
            log.warning(
                "outcome_record_skipped",
                reason="unreadable",
                record_bytes=len(record),
                error=f"{type(exc).__name__}: {exc}",
            )
            log.debug("outcome_record_skipped_traceback", exc_info=True)
            return
        if self._expired(at):
            return
        if kind == "outcome":
            earlier = self._outcomes.get(task_id)
            # The first outcome of an id stands, but an error gives way to a later outcome:
            # the task was replayed from swarm.dead and ran again (broker/tasks/processor.py).
            if earlier is None or (earlier.status == "error" and earlier.recorded_at_s <= at):
                self._forget(task_id)
                self._remember(task_id, StoredOutcome(entry["s"], entry["r"], at))
            self._cancels.pop(task_id, None)
        elif kind == "cancel" and task_id not in self._outcomes:
            self._cancels[task_id] = at

    # -- the stream --------------------------------------------------------------------------
    async def attach(
        self,
        connection: AbstractConnection,
        publish_channel: AbstractChannel,
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        """Declare the stream, replay it up to now (from where the last replay or tail of this
        process stopped), then keep tailing it; `on_lost` is called if the tail's channel
        closes. Raises OutcomeReplayError, at once when the connection drops meanwhile."""
        await publish_channel.declare_queue(
            OUTCOMES_QUEUE, durable=True, arguments=stream_arguments(self.retention_s)
        )

        async def append(record: bytes) -> None:
            await publish_channel.default_exchange.publish(
                aio_pika.Message(record, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                OUTCOMES_QUEUE,
            )

        self._append = append
        started = time.monotonic()
        await self._reader.follow(connection, publish_channel, on_lost)
        stats = self._reader.stats
        log.info(
            "outcome_store_replayed",
            outcomes=len(self._outcomes),
            cancels=len(self._cancels),
            records_applied=stats.applied,
            from_offset=stats.from_offset,
            seconds=round(time.monotonic() - started, 3),
            retention_s=self.retention_s,
        )

    async def detach(self) -> None:
        await self._reader.stop()
        self._append = None
