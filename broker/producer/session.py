"""A producer's session with RabbitMQ: a connection to one of the nodes, its channel, the tasks
exchange and the client's reply queue, consumed; opened again on the next node whenever it
drops. Tasks go out through `publish`, confirmed, sent again while the session is restored or
RabbitMQ refuses them. What the client does with tasks and replies is in client.py."""

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from broker.amqp.connection import connect
from broker.amqp.nodes import AmqpNodes, open_on_a_node, reopen_on_a_node
from broker.amqp.renewable_channel import RenewableChannel
from broker.amqp.session import CONNECTION_ERRORS
from broker.amqp.topology import declare
from broker.amqp.urls import redact
from broker.errors import BrokerError
from broker.lazy_logging import LazyLogger

log = LazyLogger("swarm.client")

REPLY_QUEUE_EXPIRES_MS = 30 * 60 * 1000
RECONNECT_FIRST_S = 0.2
RECONNECT_MAX_S = 5.0
# Bounded: closing a connection that is going away can wait forever.
CLOSE_S = 5.0
PUBLISH_ATTEMPTS = 8
PUBLISH_WAIT_S = 60.0
PUBLISH_RETRY_ON: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncio.TimeoutError)
PUBLISH_RETRY_OR_NACK: tuple[type[BaseException], ...] = (
    *PUBLISH_RETRY_ON,
    aiormq.exceptions.DeliveryError,
)

OnReply = Callable[[AbstractIncomingMessage], Awaitable[None]]


def _is_nack(error: BaseException) -> bool:
    return isinstance(error, aiormq.exceptions.DeliveryError) and isinstance(
        error.frame, aiormq.spec.Basic.Nack
    )


def _reconnect_failed(exc: Exception, retry_in_s: float) -> None:
    log.warning(
        "client_reconnect_failed", error=f"{type(exc).__name__}: {exc}", retry_in_s=retry_in_s
    )


class ProducerSession:
    """`on_reply` is handed every message of the reply queue; it is read at each delivery, so
    it may be replaced while the session is open."""

    def __init__(self, amqp_url: str | Sequence[str], *, shuffle: bool, on_reply: OnReply) -> None:
        self.on_reply = on_reply
        self._nodes = AmqpNodes(amqp_url, shuffle=shuffle)
        # On a cluster the reply queue must outlive the node it was declared on: a quorum
        # queue (replicated), consumed with acks, so that no reply is lost with a node, not
        # even one RabbitMQ had sent when the node died. On one node, as it always was.
        self._replicated_replies = len(self._nodes.urls) > 1
        # Named once: the same queue is consumed again after a reconnect.
        self.reply_queue = f"swarm.reply.{uuid.uuid4().hex}"
        self._connection: AbstractConnection | None = None
        self.channel: AbstractChannel | None = None
        self._tasks: AbstractExchange | None = None
        self._replies: AbstractQueue | None = None
        self._reply_tag: str | None = None
        # Tasks go out on a confirm channel of their own, replaced after a nack: a quorum
        # queue that refused on a channel may keep refusing on it (renewable_channel.py).
        self._publishing = RenewableChannel(self._open_publish_channel)
        self.ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        # Publishes sent again because the connection they went out on was lost unconfirmed,
        # or RabbitMQ refused them.
        self.publishes_resent = 0

    @property
    def node(self) -> str | None:
        """The RabbitMQ node connected to, password masked; None while reconnecting."""
        in_use = self._nodes.in_use
        return redact(in_use) if in_use is not None else None

    def require(self) -> tuple[AbstractChannel, AbstractQueue]:
        """The channel and the reply queue, or a clear error when never connected."""
        if self.channel is None or self._tasks is None or self._replies is None:
            raise BrokerError("the client is not connected; use `async with SwarmClient(...)`")
        return self.channel, self._replies

    # -- opening, and opening again ------------------------------------------------------------
    async def open(self) -> None:
        """Connect (AmqpUnavailable if RabbitMQ is not there), then reconnect by itself
        whenever the connection drops."""
        await open_on_a_node(self._nodes, self.open_on, self._node_failed)
        self._supervisor = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        """Whenever the session fails (its connection dropped, or RabbitMQ closed its channel),
        open a new one, with backoff, until one opens: whatever a failed attempt raised (a
        channel error while declaring is not an AmqpUnavailable). Only `close()`, which cancels
        this task, ends it."""
        while not self._closing:
            await self._lost.wait()
            self.ready.clear()
            log.warning("client_connection_lost", node=self.node)
            self._nodes.lost()
            await self._close_connection()
            reopened = await reopen_on_a_node(
                self._nodes,
                self.open_on,
                self._node_failed,
                first_s=RECONNECT_FIRST_S,
                max_s=RECONNECT_MAX_S,
                stopped=lambda: self._closing,
                on_round_failed=_reconnect_failed,
            )
            if reopened:
                log.info("client_reconnected", node=self.node)

    @staticmethod
    def _node_failed(url: str, exc: Exception) -> None:
        log.warning(
            "client_node_unavailable",
            node=redact(url),
            error=f"{type(exc).__name__}: {exc}".rstrip(": "),
        )

    async def open_on(self, url: str) -> None:
        """Connect, declare, consume the reply queue; a connection that fails on the way is
        closed, never left behind."""
        connection = await connect(url, name="swarm-client")
        self._lost = asyncio.Event()
        lost = self._lost
        connection.close_callbacks.add(lambda *_: lost.set())
        self._connection = connection
        try:
            self.channel = await connection.channel(publisher_confirms=True)
            # A channel RabbitMQ closed (a refused publish, a deleted exchange) ends the
            # session as a dropped connection does: publishes on it would fail until then.
            self.channel.close_callbacks.add(lambda *_: lost.set())
            # Declaring is idempotent; it means a task published before any daemon ever ran is
            # queued, not dropped.
            topology = await declare(self.channel)
            self._tasks = topology.tasks
            # A reply queue named by the client, not exclusive: it outlives a dropped
            # connection, so replies published while the client reconnects wait for it.
            # RabbitMQ deletes it once unused for REPLY_QUEUE_EXPIRES_MS.
            if self._replicated_replies:
                self._replies = await self.channel.declare_queue(
                    self.reply_queue,
                    durable=True,  # RabbitMQ's rule for quorum queues
                    arguments={"x-queue-type": "quorum", "x-expires": REPLY_QUEUE_EXPIRES_MS},
                )
                self._reply_tag = await self._replies.consume(self._deliver_acked)
            else:
                self._replies = await self.channel.declare_queue(
                    self.reply_queue,
                    durable=False,
                    arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS},
                )
                self._reply_tag = await self._replies.consume(self._deliver, no_ack=True)
        except BaseException:
            await self._close_connection()
            raise
        self.ready.set()

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        await self.on_reply(message)

    async def _deliver_acked(self, message: AbstractIncomingMessage) -> None:
        """A reply from the replicated queue, acknowledged once handled: one whose ack was
        lost with its node comes again, and is then a duplicate, which the client ignores."""
        try:
            await self.on_reply(message)
        finally:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await message.ack()

    async def _open_publish_channel(self) -> aiormq.abc.AbstractChannel:
        assert self.channel is not None
        underlay = await self.channel.get_underlay_channel()
        # A publish RabbitMQ returns (mandatory, no queue) resolves to the returned message.
        return await underlay.connection.channel(publisher_confirms=True, on_return_raises=False)

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), CLOSE_S)

    # -- publishing ------------------------------------------------------------------------------
    async def publish(self, message: aio_pika.Message, routing_key: str) -> object:
        """Publish a task with confirms; while the connection is being restored, or RabbitMQ
        nacks (a full queue, a quorum queue electing a leader), try again with backoff. Safe:
        the daemon answers a task id once, however often it is published. Returns the confirm,
        or the returned message (a `DeliveredMessage`) when no queue took it."""
        for attempt in range(PUBLISH_ATTEMPTS):
            if attempt:
                self.publishes_resent += 1
            if not self.ready.is_set():
                # Only when needed: on Python 3.11 wait_for can swallow a cancel that lands as
                # its inner wait completes (CPython gh-86296), which would make a cancelled
                # caller carry on.
                await asyncio.wait_for(self.ready.wait(), PUBLISH_WAIT_S)
            assert self._tasks is not None
            try:
                async with self._publishing.use() as channel:
                    try:
                        return await channel.basic_publish(
                            message.body,
                            exchange=self._tasks.name,
                            routing_key=routing_key,
                            properties=message.properties,
                            mandatory=True,
                        )
                    except aiormq.exceptions.DeliveryError as exc:
                        if _is_nack(exc):
                            self._publishing.renew(channel)
                        raise
            except PUBLISH_RETRY_OR_NACK as exc:
                # A nack: the task queue is full (reject-publish) or, on a cluster, its
                # quorum queue is electing a leader; either may pass within seconds.
                if not isinstance(exc, PUBLISH_RETRY_ON) and not _is_nack(exc):
                    raise
                if attempt == PUBLISH_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(min(5.0, 0.1 * 2**attempt))
        raise AssertionError("unreachable")

    async def consumers(self, queue: str) -> int | None:
        """How many consumers `queue` has now (a passive declare on a channel of its own),
        or None when that cannot be read (not connected, no such queue)."""
        connection = self._connection
        if connection is None or connection.is_closed:
            return None

        async def count() -> int:
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
                result = declared.declaration_result
                return int(result.consumer_count or 0)
            finally:
                if not channel.is_closed:
                    await channel.close()

        try:
            return await asyncio.wait_for(count(), CLOSE_S)
        except Exception:  # only a hint in a message
            return None

    # -- closing ---------------------------------------------------------------------------------
    async def close(self, *, delete_reply_queue: bool) -> None:
        """Stop reconnecting, delete the reply queue when told (and connected), close."""
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        if delete_reply_queue and self.ready.is_set():
            await self._delete_replies()
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()

    async def _delete_replies(self) -> None:
        """Stop consuming the reply queue, then delete it on a channel of its own (bounded:
        never holds up close). One that cannot be deleted now expires as before (x-expires)."""
        connection, replies, tag = self._connection, self._replies, self._reply_tag
        if connection is None or connection.is_closed:
            return

        async def delete() -> None:
            if replies is not None and tag is not None:
                # Cancelled by us first: RabbitMQ cancelling it for the deleted queue would be
                # logged as a warning.
                await replies.cancel(tag)
            channel = await connection.channel()
            try:
                await channel.queue_delete(self.reply_queue)
            finally:
                await channel.close()

        try:
            await asyncio.wait_for(delete(), CLOSE_S)
        except Exception as exc:  # best effort: the queue expires anyway
            log.warning(
                "client_reply_queue_not_deleted",
                queue=self.reply_queue,
                error=f"{type(exc).__name__}: {exc}",
            )
