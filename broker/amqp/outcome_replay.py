"""Reading the outcome stream into the index: a replay up to now, then the tail, on one AMQP
session; after a reconnect, resumed from the record after the last one applied.

Why resume rather than replay from the start: the index survives a reconnect (it lives in this
process), so only what was appended meanwhile is missing, and a large stream behind a slow
link would otherwise be read again in full on every reconnect, and might never be ready.

Why no wall-clock limit on the replay: its length is the stream's size over the link's speed,
unknown beforehand. It fails instead as soon as its connection or a channel under it closes,
or when no message at all arrived for `stall_s` (a stream that stopped flowing).
"""

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from broker.errors import BrokerError

OUTCOMES_QUEUE = "swarm.outcomes"
# RabbitMQ puts each stream message's offset in this header; a consumer passes it back (as an
# argument of basic.consume) to start reading at that offset.
OFFSET_HEADER = "x-stream-offset"
# A marker is appended at the start of each replay; reading it back means caught up. Records
# are msgpack maps (first byte 0x8_ or 0xde/0xdf), so no record starts with these bytes.
MARKER_PREFIX = b"marker:"
# Default for how long a replay may go without receiving a single message. Generous: the
# largest record the store writes (SWARM_OUTCOME_MAX_REPLY_MB, 32 MiB by default) arrives
# within it down to about 0.3 MB/s; a dead connection is caught sooner, by its own close.
REPLAY_STALL_S = 120.0
# Stream messages RabbitMQ may push ahead of our acks: enough to keep a slow link busy.
REPLAY_PREFETCH = 1000
# Acks on a stream are only credit, but RabbitMQ's consumer_timeout applies to them too: the
# latest message is acked (`multiple`) once per this many seconds after it arrived, which
# coalesces a burst into one frame and never leaves a tail record unacked for long.
ACK_DELAY_S = 0.05
CLOSE_S = 5.0


class OutcomeReplayError(BrokerError):
    """The replay could not reach the end of the stream on this session."""


@dataclass
class ReplayStats:
    """What the replays of this process did: for logs, metrics and tests."""

    started: int = 0
    completed: int = 0
    # Failed because the connection or a channel closed under them (failing at once).
    lost: int = 0
    # Failed because no message arrived for `stall_s`.
    stalled: int = 0
    # Failed otherwise (a refused declare or consume, ...).
    failed: int = 0
    # The current (or last) replay: the offset it started from (None: the stream's first)
    # and the records it applied before catching up.
    from_offset: int | None = None
    applied: int = 0
    # Records applied by every replay and tail of this process.
    applied_total: int = 0


class StreamReader:
    """Follows the outcome stream across sessions, folding each record in with `apply`."""

    def __init__(self, apply: Callable[[bytes], None], stall_s: float = REPLAY_STALL_S) -> None:
        self._apply = apply
        self.stall_s = stall_s
        # The offset of the first record not yet applied; None until one was.
        self.next_offset: int | None = None
        self.stats = ReplayStats()
        self._channel: AbstractChannel | None = None
        self._waiters: list[tuple[Callable[[ReplayStats], bool], asyncio.Future[None]]] = []

    async def follow(
        self,
        connection: AbstractConnection,
        publish_channel: AbstractChannel,
        on_tail_lost: Callable[[], None],
    ) -> None:
        """Replay from `next_offset` (the first record, the first time) until caught up, then
        keep tailing on the same channel; `on_tail_lost` is called if that channel closes
        later. Raises OutcomeReplayError, at once when the connection or a channel closes."""
        channel = await connection.channel()
        self._channel = channel
        closed = _CloseWatch((connection, publish_channel, channel))
        stats = self.stats
        stats.started += 1
        stats.from_offset = self.next_offset
        stats.applied = 0
        self._changed()
        caught_up = asyncio.Event()
        marker = MARKER_PREFIX + uuid.uuid4().hex.encode()
        loop = asyncio.get_running_loop()
        last_message_at = [loop.time()]
        latest: list[AbstractIncomingMessage | None] = [None]
        ack_scheduled = [False]
        acks: set[asyncio.Future[Any]] = set()

        async def on_message(message: AbstractIncomingMessage) -> None:
            last_message_at[0] = loop.time()
            body = message.body
            if body.startswith(MARKER_PREFIX):
                if body == marker:
                    caught_up.set()
            else:
                self._apply(body)
                stats.applied_total += 1
                if not caught_up.is_set():
                    stats.applied += 1
            offset = (message.headers or {}).get(OFFSET_HEADER)
            if isinstance(offset, int):
                self.next_offset = offset + 1
            if self._waiters:
                self._changed()
            latest[0] = message
            if not ack_scheduled[0]:
                ack_scheduled[0] = True
                loop.call_later(ACK_DELAY_S, ack_latest)

        def ack_latest() -> None:
            ack_scheduled[0] = False
            message, latest[0] = latest[0], None
            if message is not None and not channel.is_closed:
                acking = asyncio.ensure_future(message.ack(multiple=True))
                # It fails only with the channel, and then the replay fails (or the tail is
                # rebuilt) through the channel's close.
                acks.add(acking)
                acking.add_done_callback(acks.discard)
                acking.add_done_callback(lambda done: done.cancelled() or done.exception())

        try:
            await channel.set_qos(prefetch_count=REPLAY_PREFETCH)
            queue = await channel.get_queue(OUTCOMES_QUEUE, ensure=False)
            start: int | str = "first" if self.next_offset is None else self.next_offset
            await queue.consume(on_message, arguments={OFFSET_HEADER: start})
            await publish_channel.default_exchange.publish(aio_pika.Message(marker), OUTCOMES_QUEUE)
            await self._until_caught_up(caught_up, closed, last_message_at)
        except OutcomeReplayError:
            self._changed()
            raise
        except Exception as exc:
            if closed.event.is_set() or isinstance(exc, aio_pika.exceptions.AMQPConnectionError):
                stats.lost += 1
                self._changed()
                raise self._lost_error(closed, exc) from exc
            stats.failed += 1
            self._changed()
            raise OutcomeReplayError(
                f"outcome-stream replay failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            closed.stop()
        stats.completed += 1
        self._changed()
        # Caught up: from now on the channel only tails, and its loss means the session's.
        channel.close_callbacks.add(lambda *_: on_tail_lost())

    async def _until_caught_up(
        self, caught_up: asyncio.Event, closed: "_CloseWatch", last_message_at: list[float]
    ) -> None:
        loop = asyncio.get_running_loop()
        while not caught_up.is_set():
            if closed.event.is_set():
                self.stats.lost += 1
                raise self._lost_error(closed)
            idle_s = loop.time() - last_message_at[0]
            if idle_s >= self.stall_s:
                self.stats.stalled += 1
                raise OutcomeReplayError(
                    f"outcome-stream replay stalled: no message for {self.stall_s:g} s "
                    f"({self.stats.applied} records applied, next offset {self.next_offset})"
                )
            await _first_of(caught_up, closed.event, timeout_s=self.stall_s - idle_s)

    def _lost_error(
        self, closed: "_CloseWatch", exc: BaseException | None = None
    ) -> OutcomeReplayError:
        reason = closed.reason or (
            f"{type(exc).__name__}: {exc}".rstrip(": ") if exc else "the connection closed"
        )
        return OutcomeReplayError(
            f"connection to RabbitMQ lost during the outcome-stream replay: {reason}; "
            f"{self.stats.applied} records applied, the next replay resumes at offset "
            f"{self.next_offset}"
        )

    async def stop(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            # Bounded: closing a channel on a connection that is going away can hang.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), CLOSE_S)

    async def wait_until(
        self, predicate: Callable[[ReplayStats], bool], timeout_s: float = 60.0
    ) -> None:
        """Until `predicate(stats)` holds (checked at every change of the stats)."""
        if predicate(self.stats):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiters.remove(entry)

    def _changed(self) -> None:
        for predicate, future in self._waiters:
            if not future.done() and predicate(self.stats):
                future.set_result(None)


class _CloseWatch:
    """Sets `event` when any of the watched connection or channels closes, keeping why."""

    def __init__(self, closables: tuple[Any, ...]) -> None:
        self.event = asyncio.Event()
        self.reason = ""
        self._closables = closables
        for closable in closables:
            closable.close_callbacks.add(self._on_close)
        if any(closable.is_closed for closable in closables):
            self.event.set()

    def _on_close(self, sender: object, exc: BaseException | None = None, *_: object) -> None:
        if not self.reason:
            what = "the connection" if isinstance(sender, AbstractConnection) else "a channel"
            why = f"{type(exc).__name__}: {exc}".rstrip(": ") if exc is not None else ""
            self.reason = f"{what} closed" + (f" ({why})" if why else "")
        self.event.set()

    def stop(self) -> None:
        for closable in self._closables:
            with contextlib.suppress(Exception):
                closable.close_callbacks.discard(self._on_close)


async def _first_of(*events: asyncio.Event, timeout_s: float) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
