"""A producer and observers written with raw aio-pika and msgpack only: what an outsider with
nothing but PROTOCOL.md would write. Integration tests use it to prove the contract."""

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import msgpack
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue


@dataclass
class Received:
    body: bytes
    message: AbstractIncomingMessage

    @property
    def payload(self) -> Any:
        return msgpack.unpackb(self.body, raw=False)

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.message.headers or {})


class Inbox:
    """A queue we consume, with a way to await a number of messages (no sleeps)."""

    def __init__(self, queue: AbstractQueue) -> None:
        self.queue = queue
        self.messages: list[Received] = []
        self._changed = asyncio.Condition()

    @property
    def name(self) -> str:
        return self.queue.name

    async def start(self) -> "Inbox":
        await self.queue.consume(self._on_message, no_ack=True)
        return self

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        async with self._changed:
            self.messages.append(Received(message.body, message))
            self._changed.notify_all()

    async def wait_for(self, count: int, timeout_s: float = 60.0) -> list[Received]:
        await self.wait_until(lambda messages: len(messages) >= count, timeout_s)
        return self.messages[:count]

    async def wait_until(
        self, done: Callable[[list[Received]], bool], timeout_s: float = 60.0
    ) -> None:
        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: done(self.messages))

        await asyncio.wait_for(until(), timeout_s)

    def distinct_ids(self) -> set[str]:
        return {r.payload["id"] for r in self.messages}

    async def one(self, timeout_s: float = 60.0) -> Received:
        return (await self.wait_for(1, timeout_s))[0]


class RawProducer:
    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> "RawProducer":
        self.connection = await aio_pika.connect(self.url)
        self.channel: AbstractChannel = await self.connection.channel(publisher_confirms=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    async def inbox(self, queue: str = "", **kwargs: Any) -> Inbox:
        if queue:
            declared = await self.channel.declare_queue(queue, **kwargs)
        else:
            declared = await self.channel.declare_queue("", exclusive=True, auto_delete=True)
        return await Inbox(declared).start()

    async def watch_results(self, binding: str = "#") -> Inbox:
        exchange = await self.channel.declare_exchange(
            "swarm.results", aio_pika.ExchangeType.TOPIC, durable=True
        )
        inbox = await self.inbox()
        await inbox.queue.bind(exchange, binding)
        return inbox

    async def watch_dead(self) -> Inbox:
        """A private queue bound to the fanout `swarm.dead` exchange."""
        exchange = await self.channel.declare_exchange(
            "swarm.dead", aio_pika.ExchangeType.FANOUT, durable=True
        )
        inbox = await self.inbox()
        await inbox.queue.bind(exchange)
        return inbox

    async def publish(
        self,
        task_type: str,
        body: bytes | dict[str, Any],
        *,
        reply_to: str | None = None,
        via_queue: bool = False,
        **properties: Any,
    ) -> str:
        """Publish a task; returns its correlation id. `via_queue` uses the default exchange."""
        raw = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
        properties.setdefault("content_type", "application/msgpack")
        properties.setdefault("correlation_id", uuid.uuid4().hex)
        properties.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
        message = aio_pika.Message(raw, reply_to=reply_to, **properties)
        if via_queue:
            await self.channel.default_exchange.publish(message, f"swarm.tasks.{task_type}")
        else:
            exchange = await self.channel.get_exchange("swarm.tasks")
            await exchange.publish(message, task_type)
        return str(properties["correlation_id"])


def task(
    task_type: str = "inference", handler: str = "echo", args: Any = None, **fields: Any
) -> dict[str, Any]:
    body = {
        "v": 1,
        "id": fields.pop("id", uuid.uuid4().hex),
        "type": task_type,
        "handler": handler,
        "args": args,
    }
    body.update(fields)
    return body
