"""The producers' client: submit tasks and await replies. Imports `schemas` and aio-pika only,
so a producer never pays Ray's import.

    async with SwarmClient(url) as swarm:
        reply = await swarm.submit("inference", "echo", {"x": 1})
"""

import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    DeliveryMode,
)
from aiormq.abc import DeliveredMessage

from broker.amqp.connection import connect
from broker.amqp.nodes import AmqpNodes, open_on_a_node, reopen_on_a_node
from broker.amqp.renewable_channel import RenewableChannel
from broker.amqp.session import CONNECTION_ERRORS
from broker.amqp.topology import declare
from broker.amqp.urls import redact
from broker.errors import BrokerError
from broker.lazy_logging import LazyLogger
from schemas.codec import decode, encode
from schemas.progress import PROGRESS_STATUS, ProgressMessage
from schemas.reply import Reply
from schemas.topology import (
    CONTENT_TYPE,
    CONTROL_QUEUE,
    PROGRESS_HEADER,
    PROTOCOL_VERSION,
    STATUS_HEADER,
)

log = LazyLogger("swarm.client")

P = ParamSpec("P")
S = TypeVar("S")

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


def _is_nack(error: BaseException) -> bool:
    return isinstance(error, aiormq.exceptions.DeliveryError) and isinstance(
        error.frame, aiormq.spec.Basic.Nack
    )


def _reconnect_failed(exc: Exception, retry_in_s: float) -> None:
    log.warning(
        "client_reconnect_failed", error=f"{type(exc).__name__}: {exc}", retry_in_s=retry_in_s
    )


class SubmitError(BrokerError):
    """The task could not be handed to RabbitMQ (unroutable or refused)."""


class ReplyTimeout(BrokerError):
    """No reply arrived within the client's wait."""


class SwarmClient:
    """A producer's connection to Swarm. `amqp_url` is one URL, or the URLs of a cluster's
    nodes (comma-separated or a list), tried in turn (`shuffle`: in an order shuffled once)."""

    def __init__(
        self,
        amqp_url: str | Sequence[str],
        *,
        reply_timeout_s: float | None = None,
        shuffle: bool = False,
    ) -> None:
        self._nodes = AmqpNodes(amqp_url, shuffle=shuffle)
        # On a cluster the reply queue must outlive the node it was declared on: a quorum
        # queue (replicated), consumed with acks, so that no reply is lost with a node, not
        # even one RabbitMQ had sent when the node died. On one node, as it always was.
        self._replicated_replies = len(self._nodes.urls) > 1
        self._reply_timeout_s = reply_timeout_s
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._tasks: AbstractExchange | None = None
        self._replies: AbstractQueue | None = None
        # Tasks go out on a confirm channel of their own, replaced after a nack: a quorum
        # queue that refused on a channel may keep refusing on it (renewable_channel.py).
        self._publishing = RenewableChannel(self._open_publish_channel)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._progress_listeners: dict[str, Callable[[ProgressMessage], None]] = {}
        # Named once: the same queue is consumed again after a reconnect.
        self._reply_queue = f"swarm.reply.{uuid.uuid4().hex}"
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        # Publishes sent again because the connection they went out on was lost unconfirmed.
        self.publishes_resent = 0

    @property
    def node(self) -> str | None:
        """The RabbitMQ node connected to, password masked; None while reconnecting."""
        in_use = self._nodes.in_use
        return redact(in_use) if in_use is not None else None

    async def __aenter__(self) -> "SwarmClient":
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect (AmqpUnavailable if RabbitMQ is not there), then reconnect by itself
        whenever the connection drops."""
        await self._open()
        self._supervisor = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        """Whenever the session fails (its connection dropped, or RabbitMQ closed its channel),
        open a new one, with backoff, until one opens: whatever a failed attempt raised (a
        channel error while declaring is not an AmqpUnavailable). Only `close()`, which cancels
        this task, ends it."""
        while not self._closing:
            await self._lost.wait()
            self._ready.clear()
            log.warning("client_connection_lost", node=self.node)
            self._nodes.lost()
            await self._close_connection()
            reopened = await reopen_on_a_node(
                self._nodes,
                self._open_on,
                self._node_failed,
                first_s=RECONNECT_FIRST_S,
                max_s=RECONNECT_MAX_S,
                stopped=lambda: self._closing,
                on_round_failed=_reconnect_failed,
            )
            if reopened:
                log.info("client_reconnected", node=self.node)

    async def _open(self) -> None:
        """A session on the first node of a round that takes one (broker/amqp/nodes.py)."""
        await open_on_a_node(self._nodes, self._open_on, self._node_failed)

    @staticmethod
    def _node_failed(url: str, exc: Exception) -> None:
        log.warning(
            "client_node_unavailable",
            node=redact(url),
            error=f"{type(exc).__name__}: {exc}".rstrip(": "),
        )

    async def _open_on(self, url: str) -> None:
        """Connect, declare, consume the reply queue; a connection that fails on the way is
        closed, never left behind."""
        connection = await connect(url, name="swarm-client")
        self._lost = asyncio.Event()
        lost = self._lost
        connection.close_callbacks.add(lambda *_: lost.set())
        self._connection = connection
        try:
            self._channel = await connection.channel(publisher_confirms=True)
            # A channel RabbitMQ closed (a refused publish, a deleted exchange) ends the
            # session as a dropped connection does: publishes on it would fail until then.
            self._channel.close_callbacks.add(lambda *_: lost.set())
            # Declaring is idempotent; it means a task published before any daemon ever ran is
            # queued, not dropped.
            topology = await declare(self._channel)
            self._tasks = topology.tasks
            # A reply queue named by the client, not exclusive: it outlives a dropped
            # connection, so replies published while the client reconnects wait for it.
            # RabbitMQ deletes it once unused for REPLY_QUEUE_EXPIRES_MS.
            if self._replicated_replies:
                self._replies = await self._channel.declare_queue(
                    self._reply_queue,
                    durable=True,  # RabbitMQ's rule for quorum queues
                    arguments={"x-queue-type": "quorum", "x-expires": REPLY_QUEUE_EXPIRES_MS},
                )
                await self._replies.consume(self._on_reply_acked)
            else:
                self._replies = await self._channel.declare_queue(
                    self._reply_queue,
                    durable=False,
                    arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS},
                )
                await self._replies.consume(self._on_reply, no_ack=True)
        except BaseException:
            await self._close_connection()
            raise
        self._ready.set()

    async def _open_publish_channel(self) -> aiormq.abc.AbstractChannel:
        assert self._channel is not None
        underlay = await self._channel.get_underlay_channel()
        # A publish RabbitMQ returns (mandatory, no queue) resolves to the returned message.
        return await underlay.connection.channel(publisher_confirms=True, on_return_raises=False)

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), CLOSE_S)

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        for future in self._waiting.values():
            future.cancel()
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()

    async def _on_reply_acked(self, message: AbstractIncomingMessage) -> None:
        """A reply from the replicated queue, acknowledged once handled: one whose ack was
        lost with its node comes again, and is then a duplicate, ignored."""
        try:
            await self._on_reply(message)
        finally:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await message.ack()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        correlation_id = message.correlation_id or ""
        if (message.headers or {}).get(STATUS_HEADER) == PROGRESS_STATUS:
            listener = self._progress_listeners.get(correlation_id)
            if listener is not None:
                with contextlib.suppress(Exception):  # a bad report must not end the wait
                    listener(ProgressMessage.model_validate(decode(message.body)))
            return
        self._progress_listeners.pop(correlation_id, None)
        future = self._waiting.pop(correlation_id, None)
        if future is None or future.done():
            return  # a duplicate reply, or one for a task we stopped waiting for
        try:
            future.set_result(Reply.model_validate(decode(message.body)))
        except Exception as exc:
            future.set_exception(exc)

    def _require(self) -> tuple[AbstractChannel, AbstractExchange, AbstractQueue]:
        if self._channel is None or self._tasks is None or self._replies is None:
            raise BrokerError("the client is not connected; use `async with SwarmClient(...)`")
        return self._channel, self._tasks, self._replies

    async def send(
        self,
        task_type: str,
        handler: str,
        args: Any = None,
        *,
        task_id: str | None = None,
        on_progress: Callable[[ProgressMessage], None] | None = None,
        **fields: Any,
    ) -> "asyncio.Future[Reply]":
        """Publish one task (confirmed by RabbitMQ) and return a future of its reply.

        With `on_progress`, the task asks for progress messages and each one the handler
        reports is handed to it (best effort: some may be missed, the reply never is)."""
        _, tasks, replies = self._require()
        task_id = task_id or uuid.uuid4().hex
        body: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "id": task_id,
            "type": task_type,
            "handler": handler,
            "args": args,
        }
        body.update({key: value for key, value in fields.items() if value is not None})
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        if on_progress is not None:
            self._progress_listeners[correlation_id] = on_progress
        # A reply that never comes (the wait timed out or was cancelled) leaves nothing behind.
        future.add_done_callback(lambda _: self._forget(correlation_id))
        message = aio_pika.Message(
            encode(body),
            content_type=CONTENT_TYPE,
            message_id=task_id,
            correlation_id=correlation_id,
            reply_to=replies.name,
            delivery_mode=DeliveryMode.PERSISTENT,
            headers={PROGRESS_HEADER: True} if on_progress is not None else None,
        )
        try:
            confirmation = await self._publish(tasks, message, task_type)
        except Exception as exc:
            self._waiting.pop(correlation_id, None)
            self._progress_listeners.pop(correlation_id, None)
            raise SubmitError(f"task {task_id} was not accepted by RabbitMQ: {exc}") from exc
        if isinstance(confirmation, DeliveredMessage):
            self._waiting.pop(correlation_id, None)
            self._progress_listeners.pop(correlation_id, None)
            raise SubmitError(f"task {task_id} was unroutable: no queue for type {task_type!r}")
        return future

    def _forget(self, correlation_id: str) -> None:
        self._waiting.pop(correlation_id, None)
        self._progress_listeners.pop(correlation_id, None)

    async def _publish(
        self, tasks: AbstractExchange, message: aio_pika.Message, task_type: str
    ) -> object:
        """Publish with confirms; while the connection is being restored, or RabbitMQ nacks (a
        full queue, a quorum queue electing a leader), try again with backoff. Safe:
        the daemon answers a task id once, however often it is published."""
        for attempt in range(PUBLISH_ATTEMPTS):
            if attempt:
                self.publishes_resent += 1
            if not self._ready.is_set():
                # Only when needed: on Python 3.11 wait_for can swallow a cancel that lands as
                # its inner wait completes (CPython gh-86296), which would make a cancelled
                # caller carry on.
                await asyncio.wait_for(self._ready.wait(), PUBLISH_WAIT_S)
            assert self._tasks is not None
            try:
                async with self._publishing.use() as channel:
                    try:
                        return await channel.basic_publish(
                            message.body,
                            exchange=self._tasks.name,
                            routing_key=task_type,
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

    async def submit(
        self,
        task_type: str,
        handler: str,
        args: Any = None,
        *,
        timeout_s: float | None = None,
        **fields: Any,
    ) -> Reply:
        """Publish one task and wait for its reply. `fields` are the optional task keys
        (task_id, resources, pool, priority, deadline, max_retries, and `run_timeout_s` for
        the task's own `timeout_s`)."""
        if "run_timeout_s" in fields:
            fields["timeout_s"] = fields.pop("run_timeout_s")
        future = await self.send(task_type, handler, args, **fields)
        return await self._wait(future, timeout_s)

    async def _wait(self, future: "asyncio.Future[Reply]", timeout_s: float | None) -> Reply:
        wait_s = timeout_s if timeout_s is not None else self._reply_timeout_s
        try:
            return await asyncio.wait_for(future, wait_s)
        except asyncio.TimeoutError as exc:
            raise ReplyTimeout(f"no reply within {wait_s:g} s") from exc

    async def map(
        self,
        task_type: str,
        handler: str,
        many_args: Iterable[Any],
        *,
        max_in_flight: int = 256,
        timeout_s: float | None = None,
        **fields: Any,
    ) -> AsyncIterator[Reply]:
        """Submit a task per item with at most `max_in_flight` unanswered; yield replies in
        the order of the inputs."""
        window: asyncio.Queue[asyncio.Future[Reply] | None] = asyncio.Queue(max_in_flight)

        async def produce() -> None:
            for args in many_args:
                await window.put(await self.send(task_type, handler, args, **fields))
            await window.put(None)

        producer = asyncio.create_task(produce())
        try:
            while (future := await window.get()) is not None:
                yield await self._wait(future, timeout_s)
            await producer
        finally:
            producer.cancel()

    async def status(self, *, timeout_s: float = 30.0) -> dict[str, Any]:
        """The daemon's `status` control answer: pools, nodes, queues, limits."""
        channel, _, replies = self._require()
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        await channel.default_exchange.publish(
            aio_pika.Message(
                encode({"v": PROTOCOL_VERSION, "op": "status"}),
                content_type=CONTENT_TYPE,
                correlation_id=correlation_id,
                reply_to=replies.name,
            ),
            CONTROL_QUEUE,
        )
        reply = await self._wait(future, timeout_s)
        if reply.status != "ok":
            raise BrokerError(f"status failed: {reply.error}")
        return reply.result  # type: ignore[no-any-return]


def _takes_the_arguments_of(
    source: Callable[Concatenate[Any, P], None],
) -> Callable[[Callable[Concatenate[S, ...], None]], Callable[Concatenate[S, P], None]]:
    """Declares that the decorated `__init__` takes exactly the arguments of `source` (another
    `__init__`), so they are written once: type checkers and IDEs read them from the
    ParamSpec, and `inspect.signature` (help(), Jupyter, jedi) from `__wrapped__`."""

    def declare(init: Callable[Concatenate[S, ...], None]) -> Callable[Concatenate[S, P], None]:
        functools.update_wrapper(init, source, assigned=(), updated=())
        return init

    return declare


class SyncSwarmClient:
    """A blocking wrapper for scripts: `with SyncSwarmClient(url) as swarm: swarm.submit(...)`."""

    @_takes_the_arguments_of(SwarmClient.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = SwarmClient(*args, **kwargs)

    def __enter__(self) -> "SyncSwarmClient":
        self._loop.run_until_complete(self._client.connect())
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.run_until_complete(self._client.close())
        self._loop.close()

    def submit(self, task_type: str, handler: str, args: Any = None, **fields: Any) -> Reply:
        return self._loop.run_until_complete(
            self._client.submit(task_type, handler, args, **fields)
        )

    def map(
        self, task_type: str, handler: str, many_args: Iterable[Any], **fields: Any
    ) -> list[Reply]:
        async def collect() -> list[Reply]:
            return [r async for r in self._client.map(task_type, handler, many_args, **fields)]

        return self._loop.run_until_complete(collect())

    def status(self) -> dict[str, Any]:
        return self._loop.run_until_complete(self._client.status())
