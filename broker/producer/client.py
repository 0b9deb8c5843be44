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
from aio_pika.abc import AbstractIncomingMessage, DeliveryMode
from aiormq.abc import DeliveredMessage

from broker.errors import BrokerError
from broker.producer.errors import ReplyTimeout, SubmitError
from broker.producer.session import ProducerSession
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

__all__ = ["ReplyTimeout", "SubmitError", "SwarmClient", "SyncSwarmClient"]

P = ParamSpec("P")
S = TypeVar("S")

# How long status and cancel wait for the daemon's answer unless told.
CONTROL_WAIT_S = 30.0


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
        self._session = ProducerSession(amqp_url, shuffle=shuffle, on_reply=self._on_reply)
        self._reply_timeout_s = reply_timeout_s
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

    @property
    def node(self) -> str | None:
        """The RabbitMQ node connected to, password masked; None while reconnecting."""
        return self._session.node

    @property
    def publishes_resent(self) -> int:
        """Publishes sent again: their connection was lost unconfirmed, or RabbitMQ refused."""
        return self._session.publishes_resent

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
        await self._session.open()

    @property
    def reply_queue(self) -> str:
        """The name of this client's reply queue."""
        return self._session.reply_queue

    @property
    def replies_owed(self) -> int:
        """Requests published whose reply has not come (whether or not anyone waits)."""
        return len(self._owed)

    async def close(self) -> None:
        """Stop waiting, delete the reply queue (see the class: `delete_reply_queue`) and
        close the connection."""
        for future in self._waiting.values():
            future.cancel()
        delete = self._delete_reply_queue
        if delete is None:
            delete = not self._owed
        await self._session.close(delete_reply_queue=delete)

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
        _, replies = self._session.require()
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
            confirmation = await self._session.publish(message, task_type)
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
        """How many consumers `queue` has now, or None when that cannot be read (not
        connected, no such queue)."""
        return await self._session.consumers(queue)

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
        channel, replies = self._session.require()
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
