"""`swarm.dead` as an operator uses it: read it without removing anything, replay letters to
the queues they came from, purge them.

Reading. `swarm.dead` is a quorum queue, and AMQP has no way to browse one. A scan consumes it
with acknowledgements, on a channel of its own, up to the number of messages it held when the
scan began (at most `limit`), and acknowledges nothing it only read: when the box closes, its
channel closes and RabbitMQ takes every unacknowledged letter back. A letter is removed only
by `remove` (purge) or by `replay`, which acknowledges it once its republish is confirmed.
RabbitMQ adds `x-delivery-count` to a letter each time it takes it back; a replay leaves that
header out, so the task's own count starts again.

Replaying. The letter's body and properties go to its source queue (`x-swarm-source-queue`)
through the default exchange, mandatory and confirmed, without the headers Swarm or RabbitMQ
added, and with `x-swarm-replay: <id>`: the daemon runs a task again that carries it although
the outcome store holds its error (the wire contract's rule; a stored `ok` is never re-run).
"""

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq.abc import DeliveredMessage

from broker.amqp.connection import connect
from broker.amqp.nodes import AmqpNodes, open_on_a_node
from broker.errors import BrokerError
from schemas.codec import decode
from schemas.topology import (
    ATTEMPTS_HEADER,
    DEAD_LETTERED_AT_HEADER,
    DEAD_QUEUE,
    DELIVERY_COUNT_HEADER,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    ORIGINAL_USER_HEADER,
    REPLAY_HEADER,
    SOURCE_QUEUE_HEADER,
    TRACEBACK_HEADER,
    TRUNCATED_HEADER,
    UNDELIVERED_REPLY_HEADER,
)

# Headers a replay leaves out: Swarm's own on the dead letter, and RabbitMQ's counts.
ADDED_HEADERS = frozenset(
    {
        ATTEMPTS_HEADER,
        DEAD_LETTERED_AT_HEADER,
        DELIVERY_COUNT_HEADER,
        ERROR_CODE_HEADER,
        ERROR_MESSAGE_HEADER,
        ORIGINAL_USER_HEADER,
        REPLAY_HEADER,
        SOURCE_QUEUE_HEADER,
        TRACEBACK_HEADER,
        TRUNCATED_HEADER,
        UNDELIVERED_REPLY_HEADER,
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
# A scan ends when no letter arrived for this long (letters taken by another reader).
IDLE_S = 2.0


class ReplayError(BrokerError):
    """A letter could not be replayed (no source queue, the queue is gone, RabbitMQ refused)."""


@dataclass(frozen=True)
class DeadLetter:
    """One letter of `swarm.dead`, as read, with what operators filter and group on."""

    message: AbstractIncomingMessage = field(repr=False, compare=False)
    task_id: str | None
    code: str
    error: str
    handler: str | None
    task_type: str | None
    queue: str | None
    attempts: int | None
    traceback: str | None
    dead_lettered_at: float | None
    args: Any = None
    body_decoded: bool = False

    @property
    def body(self) -> bytes:
        return bytes(self.message.body)

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.message.headers or {})

    def age_s(self, now: float | None = None) -> float | None:
        if self.dead_lettered_at is None:
            return None
        return max(0.0, (now if now is not None else time.time()) - self.dead_lettered_at)


def read_letter(message: AbstractIncomingMessage) -> DeadLetter:
    """What a letter says; a body that is not a task (malformed, refused) leaves the task's
    fields empty and keeps the bytes."""
    headers = message.headers or {}
    body: Any = None
    decoded = False
    try:
        body = decode(bytes(message.body))
        decoded = isinstance(body, dict)
    except Exception:  # a dead letter may be any bytes a producer sent
        body = None
    fields = body if decoded else {}

    def text(value: Any) -> str | None:
        if isinstance(value, bytes):
            return value.decode(errors="replace")
        return value if isinstance(value, str) else None

    task_id = text(fields.get("id")) or text(message.message_id)
    at = headers.get(DEAD_LETTERED_AT_HEADER)
    attempts = headers.get(ATTEMPTS_HEADER)
    return DeadLetter(
        message=message,
        task_id=task_id,
        code=text(headers.get(ERROR_CODE_HEADER)) or "",
        error=text(headers.get(ERROR_MESSAGE_HEADER)) or "",
        handler=text(fields.get("handler")),
        task_type=text(fields.get("type")),
        queue=text(headers.get(SOURCE_QUEUE_HEADER)),
        attempts=attempts if isinstance(attempts, int) else None,
        traceback=text(headers.get(TRACEBACK_HEADER)),
        dead_lettered_at=float(at) if isinstance(at, int | float) else None,
        args=fields.get("args"),
        body_decoded=decoded,
    )


class DeadLetterBox:
    """A connection to `swarm.dead` for one command: scan, then replay or remove letters."""

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        self._connection = connection
        self._channel = channel

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, amqp_url: str) -> AsyncIterator["DeadLetterBox"]:
        connection = await open_on_a_node(AmqpNodes(amqp_url), connect)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
            yield cls(connection, channel)
        finally:
            # Closing hands every letter read and not acknowledged back to swarm.dead.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 10)

    async def scan(self, limit: int) -> list[DeadLetter]:
        """Up to `limit` letters, oldest first, none removed (see the module's docstring)."""
        queue = await self._channel.declare_queue(DEAD_QUEUE, passive=True)
        held = queue.declaration_result.message_count or 0
        wanted = min(held, limit)
        if wanted <= 0:
            return []
        await self._channel.set_qos(prefetch_count=wanted)
        arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        tag = await queue.consume(arrived.put, no_ack=False)
        letters: list[DeadLetter] = []
        try:
            while len(letters) < wanted:
                try:
                    message = await asyncio.wait_for(arrived.get(), IDLE_S)
                except asyncio.TimeoutError:
                    break  # fewer than counted: another reader took some
                letters.append(read_letter(message))
        finally:
            await queue.cancel(tag)
        return letters

    async def replay(self, letter: DeadLetter, replay_id: str | None = None) -> None:
        """Republish the letter to its source queue (confirmed), then remove it."""
        if not letter.queue:
            raise ReplayError(f"dead letter {letter.task_id!r} names no source queue")
        message = letter.message
        headers = {k: v for k, v in (message.headers or {}).items() if k not in ADDED_HEADERS}
        headers[REPLAY_HEADER] = replay_id or uuid.uuid4().hex
        again = aio_pika.Message(
            bytes(message.body),
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            delivery_mode=message.delivery_mode,
            priority=message.priority,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            message_id=message.message_id,
            timestamp=message.timestamp,
            type=message.type,
            app_id=message.app_id,
        )
        try:
            confirmation = await self._channel.default_exchange.publish(
                again, routing_key=letter.queue, mandatory=True
            )
        except Exception as exc:
            raise ReplayError(
                f"dead letter {letter.task_id!r} was not republished to {letter.queue}: {exc}"
            ) from exc
        if isinstance(confirmation, DeliveredMessage):
            raise ReplayError(f"dead letter {letter.task_id!r}: no queue {letter.queue!r}")
        await message.ack()

    async def remove(self, letter: DeadLetter) -> None:
        await letter.message.ack()
