"""The producers' client: submit tasks and await replies. Imports `schemas` and aio-pika only,
so a producer never pays Ray's import.

    async with SwarmClient(url) as swarm:
        reply = await swarm.submit("inference", "echo", {"x": 1}, wait_s=60, run_timeout_s=30)

Two time limits, never to be confused: `wait_s` is how long this client waits for a reply
(nothing is sent to the daemon about it), `run_timeout_s` is the task's own run limit, the
wire field `timeout_s` (the daemon stops the run past it and answers `timeout`).
"""

import asyncio
import contextlib
import functools
import uuid
import warnings
import weakref
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
    REPLAY_HEADER,
    STATUS_HEADER,
    task_queue,
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
# How long status and cancel wait for the daemon's answer unless told.
CONTROL_WAIT_S = 30.0
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
    """No reply arrived within the client's wait (`wait_s`). `task_id` names the task (None
    for a control request), `queue` the queue it was sent to, and `consumers` how many
    consumers that queue had when the wait ended (0: no daemon reads it; None: unknown)."""

    def __init__(
        self,
        message: str,
        *,
        task_id: str | None = None,
        queue: str | None = None,
        consumers: int | None = None,
    ) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.queue = queue
        self.consumers = consumers


def _deprecated_timeout(fields: dict[str, Any], wait_s: float | None, method: str) -> float | None:
    """`timeout_s=` on submit, map and status was the client's wait: still read as `wait_s`
    for one release, with a DeprecationWarning (the task's run limit is `run_timeout_s`)."""
    if "timeout_s" not in fields:
        return wait_s
    old = fields.pop("timeout_s")
    warnings.warn(
        f"{method}(timeout_s=...) is deprecated: it is the client's wait, now `wait_s`; "
        "the task's run limit is `run_timeout_s`",
        DeprecationWarning,
        stacklevel=3,
    )
    return wait_s if wait_s is not None else old


class SwarmClient:
    """A producer's connection to Swarm. `amqp_url` is one URL, or the URLs of a cluster's
    nodes (comma-separated or a list), tried in turn (`shuffle`: in an order shuffled once).

    `reply_timeout_s` is the default client-side wait for a reply (None: no limit), used where
    a call gives no `wait_s`. On `close()` the client deletes its reply queue
    (`swarm.reply.<uuid>`) unless replies are still owed to it: tasks it sent whose reply has
    not come (their wait ended first); that queue is kept so that the daemon can deliver
    them, and RabbitMQ deletes it once unused for 30 minutes. `delete_reply_queue=True`
    deletes it even then (a reply that comes later is dead-lettered `reply_undeliverable`,
    as `swarm dead ls` shows), `False` never deletes it."""

    def __init__(
        self,
        amqp_url: str | Sequence[str],
        *,
        reply_timeout_s: float | None = None,
        shuffle: bool = False,
        delete_reply_queue: bool | None = None,
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
        self._reply_tag: str | None = None
        # Tasks go out on a confirm channel of their own, replaced after a nack: a quorum
        # queue that refused on a channel may keep refusing on it (renewable_channel.py).
        self._publishing = RenewableChannel(self._open_publish_channel)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        # Correlation ids of requests published and not yet answered, whether or not anyone
        # still waits: while any is owed, close() keeps the reply queue (delete_reply_queue).
        self._owed: set[str] = set()
        # What each reply future is for, (task id, queue), named when a wait for it ends.
        self._sent: weakref.WeakKeyDictionary[asyncio.Future[Reply], tuple[str | None, str]] = (
            weakref.WeakKeyDictionary()
        )
        self._delete_reply_queue = delete_reply_queue
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
                self._reply_tag = await self._replies.consume(self._on_reply_acked)
            else:
                self._replies = await self._channel.declare_queue(
                    self._reply_queue,
                    durable=False,
                    arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS},
                )
                self._reply_tag = await self._replies.consume(self._on_reply, no_ack=True)
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

    @property
    def reply_queue(self) -> str:
        """The name of this client's reply queue."""
        return self._reply_queue

    @property
    def replies_owed(self) -> int:
        """Requests published whose reply has not come (whether or not anyone waits)."""
        return len(self._owed)

    async def close(self) -> None:
        """Stop waiting, delete the reply queue (see the class: `delete_reply_queue`) and
        close the connection."""
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        for future in self._waiting.values():
            future.cancel()
        delete = self._delete_reply_queue
        if delete is None:
            delete = not self._owed
        if delete and self._ready.is_set():
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
                await channel.queue_delete(self._reply_queue)
            finally:
                await channel.close()

        try:
            await asyncio.wait_for(delete(), CLOSE_S)
        except Exception as exc:  # best effort: the queue expires anyway
            log.warning(
                "client_reply_queue_not_deleted",
                queue=self._reply_queue,
                error=f"{type(exc).__name__}: {exc}",
            )

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
        self._owed.discard(correlation_id)
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
        run_timeout_s: float | None = None,
        replay: bool = False,
        **fields: Any,
    ) -> "asyncio.Future[Reply]":
        """Publish one task (confirmed by RabbitMQ) and return a future of its reply.

        `replay`: the task runs again although its id's stored outcome is an error (the wire
        contract's `x-swarm-replay`); a stored `ok` is still answered from the store.

        `fields` are the task's optional wire keys (resources, pool, priority, deadline,
        max_retries); `run_timeout_s` is the task's run limit, the wire key `timeout_s` (which
        `fields` may also name, as a backfill line does). Wait for the future with
        `asyncio.wait_for`, or use `submit` with `wait_s`.

        With `on_progress`, the task asks for progress messages and each one the handler
        reports is handed to it (best effort: some may be missed, the reply never is)."""
        _, tasks, replies = self._require()
        task_id = task_id or uuid.uuid4().hex
        if run_timeout_s is not None:
            fields["timeout_s"] = run_timeout_s
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
        self._sent[future] = (task_id, task_queue(task_type))
        self._owed.add(correlation_id)
        headers: dict[str, Any] = {}
        if on_progress is not None:
            headers[PROGRESS_HEADER] = True
        if replay:
            headers[REPLAY_HEADER] = uuid.uuid4().hex
        message = aio_pika.Message(
            encode(body),
            content_type=CONTENT_TYPE,
            message_id=task_id,
            correlation_id=correlation_id,
            reply_to=replies.name,
            delivery_mode=DeliveryMode.PERSISTENT,
            headers=headers or None,
        )
        try:
            confirmation = await self._publish(tasks, message, task_type)
        except Exception as exc:
            self._waiting.pop(correlation_id, None)
            self._progress_listeners.pop(correlation_id, None)
            self._owed.discard(correlation_id)
            raise SubmitError(f"task {task_id} was not accepted by RabbitMQ: {exc}") from exc
        if isinstance(confirmation, DeliveredMessage):
            self._waiting.pop(correlation_id, None)
            self._progress_listeners.pop(correlation_id, None)
            self._owed.discard(correlation_id)
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
        wait_s: float | None = None,
        run_timeout_s: float | None = None,
        **fields: Any,
    ) -> Reply:
        """Publish one task and wait for its reply.

        `wait_s` is how long this client waits for the reply (default: the client's
        `reply_timeout_s`; None there too: no limit); past it, `ReplyTimeout`, and the task
        goes on. `run_timeout_s` is the task's run limit (the wire key `timeout_s`): past it
        the daemon stops the run and answers `timeout`. `fields` are the other optional task
        keys (task_id, resources, pool, priority, deadline, max_retries, on_progress).
        `timeout_s=` is the deprecated name of `wait_s`."""
        wait_s = _deprecated_timeout(fields, wait_s, "submit")
        future = await self.send(task_type, handler, args, run_timeout_s=run_timeout_s, **fields)
        return await self._wait(future, wait_s)

    async def _wait(self, future: "asyncio.Future[Reply]", wait_s: float | None) -> Reply:
        limit_s = wait_s if wait_s is not None else self._reply_timeout_s
        try:
            return await asyncio.wait_for(future, limit_s)
        except asyncio.TimeoutError as exc:
            task_id, queue = self._sent.get(future, (None, CONTROL_QUEUE))
            raise await self._reply_timeout(task_id, queue, limit_s) from exc

    async def _reply_timeout(
        self, task_id: str | None, queue: str, wait_s: float | None
    ) -> ReplyTimeout:
        """The timeout, saying which task and, when it can tell, that no daemon consumes the
        queue the request went to (a passive declare's consumer count)."""
        what = f"task {task_id}" if task_id is not None else f"the request on {queue}"
        message = f"no reply for {what} within {wait_s:g} s"
        consumers = await self.consumers(queue)
        if consumers == 0:
            message += f"; no daemon consumes {queue} (is `swarm run` up?)"
        elif consumers is not None:
            message += f" ({queue} has {consumers} consumer{'s' if consumers != 1 else ''})"
        return ReplyTimeout(message, task_id=task_id, queue=queue, consumers=consumers)

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

    async def map(
        self,
        task_type: str,
        handler: str,
        many_args: Iterable[Any],
        *,
        max_in_flight: int = 256,
        wait_s: float | None = None,
        run_timeout_s: float | None = None,
        **fields: Any,
    ) -> AsyncIterator[Reply]:
        """Submit a task per item with at most `max_in_flight` unanswered; yield replies in
        the order of the inputs. `wait_s` bounds the wait for each reply, `run_timeout_s` is
        each task's run limit (as for `submit`; `timeout_s=` is the deprecated `wait_s`)."""
        wait_s = _deprecated_timeout(fields, wait_s, "map")
        window: asyncio.Queue[asyncio.Future[Reply] | None] = asyncio.Queue(max_in_flight)

        async def produce() -> None:
            for args in many_args:
                future = await self.send(
                    task_type, handler, args, run_timeout_s=run_timeout_s, **fields
                )
                await window.put(future)
            await window.put(None)

        producer = asyncio.create_task(produce())
        try:
            while (future := await window.get()) is not None:
                yield await self._wait(future, wait_s)
            await producer
        finally:
            producer.cancel()

    async def _control(self, request: dict[str, Any], wait_s: float) -> Any:
        """Send a control request to `swarm.control` and return its ok answer's result. The
        request expires from the queue after `wait_s` unread: none lingers for a daemon that
        starts later, when no one waits for its answer any more."""
        channel, _, replies = self._require()
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        future.add_done_callback(lambda _: self._forget(correlation_id))
        self._owed.add(correlation_id)
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    encode({"v": PROTOCOL_VERSION, **request}),
                    content_type=CONTENT_TYPE,
                    correlation_id=correlation_id,
                    reply_to=replies.name,
                    expiration=max(wait_s, 0.001),
                ),
                CONTROL_QUEUE,
            )
        except BaseException:
            self._owed.discard(correlation_id)
            future.cancel()
            raise
        reply = await self._wait(future, wait_s)
        if reply.status != "ok":
            raise BrokerError(f"{request['op']} failed: {reply.error}")
        return reply.result

    async def status(self, *, wait_s: float | None = None, **deprecated: Any) -> dict[str, Any]:
        """The daemon's `status` control answer: pools, nodes, queues, limits. `wait_s`:
        how long to wait for it (default 30 s; `timeout_s=` is its deprecated name)."""
        wait_s = _deprecated_timeout(deprecated, wait_s, "status")
        if deprecated:
            raise TypeError(f"status() got unexpected keyword arguments {sorted(deprecated)}")
        return await self._control(  # type: ignore[no-any-return]
            {"op": "status"}, CONTROL_WAIT_S if wait_s is None else wait_s
        )

    async def cancel(self, task_id: str, *, wait_s: float = CONTROL_WAIT_S) -> dict[str, Any]:
        """Ask the daemon to cancel the task `task_id`; its answer's `state` says what
        happened: `waiting` or `running` (the task will be answered `cancelled`), `unseen`
        (not arrived yet: remembered, and answered `cancelled` when it comes, within
        `remembered_s`), `finishing` (too late: its outcome is being published) or
        `finished` (too late: `status` is its stored outcome)."""
        return await self._control(  # type: ignore[no-any-return]
            {"op": "cancel", "id": task_id}, wait_s
        )

    async def task(self, task_id: str, *, wait_s: float = CONTROL_WAIT_S) -> dict[str, Any]:
        """What the daemon that answers knows of the task `task_id`; its answer's `state`:
        `done` (`status`, `recorded_at_s` and `reply`, the stored reply as a mapping, or only
        `reply_bytes` when it is over 1 MiB), `waiting`, `running`, `finishing` (its outcome
        is being published) or `unknown` (not seen by that daemon, or past the outcome
        retention window; a task waiting in RabbitMQ's queue is not seen yet)."""
        return await self._control(  # type: ignore[no-any-return]
            {"op": "task", "id": task_id}, wait_s
        )


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

    def status(self, **kwargs: Any) -> dict[str, Any]:
        return self._loop.run_until_complete(self._client.status(**kwargs))

    def cancel(self, task_id: str, **kwargs: Any) -> dict[str, Any]:
        return self._loop.run_until_complete(self._client.cancel(task_id, **kwargs))
