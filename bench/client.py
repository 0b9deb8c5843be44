"""The one load client of the bench, used unchanged against every system.

It is what a producer with nothing but aio-pika and msgpack would write (no Swarm import):
a pipelined producer that keeps at most `window` tasks unanswered, publishes each task
persistent and waits for RabbitMQ's publisher confirm, and consumes the replies from its own
reply queue, matching them by `correlation_id`. The latency of a task is the time from just
before its publish to its reply's arrival; throughput is tasks over the wall time from the
first publish to the last reply.

Systems differ only in how a task body is made and how a reply is checked (`Codec`): Swarm
and the reference take the same msgpack task body (the reference echoes it back, Swarm
answers with a protocol reply), Celery gets its own message format.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import msgpack
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq.abc import DeliveredMessage

TASK_TYPE = "inference"
TASKS_EXCHANGE = "swarm.tasks"
CONTROL_QUEUE = "swarm.control"
CONTENT_TYPE = "application/msgpack"
SMALL_BODY_BYTES = 150  # the default task: a whole msgpack body of exactly this size


class BenchError(RuntimeError):
    """A run could not complete: a refused publish, a wrong reply, or no reply in time."""


def swarm_body(task_id: str, args: bytes) -> bytes:
    return msgpack.packb(
        {"v": 1, "id": task_id, "type": TASK_TYPE, "handler": "echo", "args": args},
        use_bin_type=True,
    )


def args_for(payload: str) -> bytes:
    """The task's `args` for a payload name: `small` pads the whole body to 150 bytes,
    otherwise the name is the size of `args` in bytes ("1024", "65536")."""
    if payload != "small":
        return b"x" * int(payload)
    # A 32-character id like every task's; msgpack's bin8 header is 2 bytes up to 255 bytes.
    overhead = len(swarm_body(uuid.uuid4().hex, b""))
    size = SMALL_BODY_BYTES - overhead
    body = swarm_body(uuid.uuid4().hex, b"x" * size)
    assert len(body) == SMALL_BODY_BYTES, len(body)
    return b"x" * size


@dataclass
class Codec:
    """How one system's tasks are encoded and its replies checked."""

    name: str
    exchange: str
    routing_key: str
    # (task id, args, reply queue) -> (body, extra message properties); the task id is also
    # the message's correlation_id, which the reply must carry back
    make: Callable[[str, bytes, str], tuple[bytes, dict[str, Any]]]
    # (reply body, sent body, args) -> None when the reply is right, else why not
    check: Callable[[bytes, bytes, bytes], str | None]


def _swarm_make(task_id: str, args: bytes, reply_to: str) -> tuple[bytes, dict[str, Any]]:
    return swarm_body(task_id, args), {"content_type": CONTENT_TYPE, "message_id": task_id}


def _swarm_check(reply: bytes, sent: bytes, args: bytes) -> str | None:
    answer = msgpack.unpackb(reply, raw=False)
    if answer.get("status") != "ok":
        return f"status {answer.get('status')!r}: {answer.get('error')}"
    if answer.get("result") != args:
        return "the echoed result differs from the args"
    return None


def _echo_check(reply: bytes, sent: bytes, args: bytes) -> str | None:
    return None if reply == sent else "the echoed body differs from the task body"


SWARM = Codec("swarm", TASKS_EXCHANGE, TASK_TYPE, _swarm_make, _swarm_check)
# The reference server consumes the same queue with the same body, and echoes the body back.
REFERENCE = Codec("reference", TASKS_EXCHANGE, TASK_TYPE, _swarm_make, _echo_check)
# ray-glue answers with a protocol reply, its result what its Ray actor returned.
RAY_GLUE = Codec("ray-glue", TASKS_EXCHANGE, TASK_TYPE, _swarm_make, _swarm_check)


@dataclass
class RunResult:
    tasks: int
    window: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


class LoadClient:
    """One connection, a confirm channel for tasks and a private reply queue."""

    def __init__(self, url: str, codec: Codec) -> None:
        self.url = url
        self.codec = codec
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._reply_queue = ""
        self._exchange: Any = None
        self._pending: dict[str, tuple[float, bytes, bytes]] = {}
        self._on_done: Callable[[str, float, str | None], None] | None = None

    async def __aenter__(self) -> LoadClient:
        self._connection = await aio_pika.connect(
            self.url, client_properties={"connection_name": f"bench-{self.codec.name}"}
        )
        self._channel = await self._connection.channel(publisher_confirms=True)
        queue = await self._channel.declare_queue("", exclusive=True, auto_delete=True)
        self._reply_queue = queue.name
        await queue.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        arrived = time.perf_counter()
        key = message.correlation_id or ""
        pending = self._pending.pop(key, None)
        if pending is None or self._on_done is None:
            return  # a status answer, or a duplicate reply
        sent_at, body, args = pending
        try:
            problem = self.codec.check(message.body, body, args)
        except Exception as exc:
            problem = f"unreadable reply: {exc!r}"
        self._on_done(key, (arrived - sent_at) * 1000.0, problem)

    async def _publish(self, body: bytes, properties: dict[str, Any], key: str) -> None:
        assert self._channel is not None
        message = aio_pika.Message(
            body,
            correlation_id=key,
            reply_to=self._reply_queue,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            **properties,
        )
        if self._exchange is None:
            self._exchange = (
                await self._channel.get_exchange(self.codec.exchange, ensure=False)
                if self.codec.exchange
                else self._channel.default_exchange
            )
        confirmation = await self._exchange.publish(message, self.codec.routing_key, mandatory=True)
        if isinstance(confirmation, DeliveredMessage):
            raise BenchError(f"task unroutable to {self.codec.routing_key!r} (nothing declared)")

    async def run(
        self, count: int, window: int, args: bytes, *, timeout_s: float = 300.0
    ) -> RunResult:
        """Send `count` tasks keeping at most `window` unanswered; wait for every reply."""
        if count <= 0:
            return RunResult(0, window, 0.0, [])
        latencies: list[float] = []
        slots = asyncio.Semaphore(window)
        finished = asyncio.Event()
        failure: list[str] = []
        publishes: set[asyncio.Task[None]] = set()

        def done(key: str, latency_ms: float, problem: str | None) -> None:
            if problem is not None:
                failure.append(problem)
                finished.set()
            latencies.append(latency_ms)
            slots.release()
            if len(latencies) >= count:
                finished.set()

        def published(task: asyncio.Task[None]) -> None:
            publishes.discard(task)
            if not task.cancelled() and task.exception() is not None:
                failure.append(f"publish failed: {task.exception()!r}")
                finished.set()

        self._on_done = done
        started = time.perf_counter()
        deadline = started + timeout_s

        async def produce() -> None:
            for _ in range(count):
                await slots.acquire()
                if finished.is_set():
                    return
                key = uuid.uuid4().hex
                body, properties = self.codec.make(key, args, self._reply_queue)
                self._pending[key] = (time.perf_counter(), body, args)
                task = asyncio.create_task(self._publish(body, properties, key))
                publishes.add(task)
                task.add_done_callback(published)

        producer = asyncio.create_task(produce())
        try:
            await asyncio.wait_for(finished.wait(), max(0.0, deadline - time.perf_counter()))
        except asyncio.TimeoutError:
            failure.append(
                f"{len(latencies)} of {count} replies within {timeout_s:g} s "
                f"(window {window}, {self.codec.name})"
            )
        finally:
            elapsed = time.perf_counter() - started
            producer.cancel()
            for task in list(publishes):
                task.cancel()
            self._on_done = None
            self._pending.clear()
        if failure:
            raise BenchError(failure[0])
        return RunResult(count, window, elapsed, latencies)

    async def control_status(self, timeout_s: float) -> dict[str, Any] | None:
        """Ask a Swarm daemon for `status`; None when it did not answer within `timeout_s`
        (or the control queue does not exist yet)."""
        assert self._channel is not None
        key = uuid.uuid4().hex
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def on_answer(message: AbstractIncomingMessage) -> None:
            if message.correlation_id == key and not answer.done():
                answer.set_result(message.body)

        queue = await self._channel.declare_queue("", exclusive=True, auto_delete=True)
        tag = await queue.consume(on_answer, no_ack=True)
        try:
            confirmation = await self._channel.default_exchange.publish(
                aio_pika.Message(
                    msgpack.packb({"v": 1, "op": "status"}),
                    content_type=CONTENT_TYPE,
                    correlation_id=key,
                    reply_to=queue.name,
                ),
                CONTROL_QUEUE,
                mandatory=True,
            )
            if isinstance(confirmation, DeliveredMessage):
                return None  # no control queue yet: the daemon has not declared it
            body = await asyncio.wait_for(answer, timeout_s)
        except asyncio.TimeoutError:
            return None
        finally:
            await queue.cancel(tag)
            await queue.delete(if_unused=False, if_empty=False)
        reply = msgpack.unpackb(body, raw=False)
        if reply.get("status") != "ok":
            raise BenchError(f"status answered {reply.get('status')}: {reply.get('error')}")
        result: dict[str, Any] = reply["result"]
        return result
