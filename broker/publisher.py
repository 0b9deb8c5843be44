"""Publishing outcomes with publisher confirms: the reply, its copy, and the dead letter."""

import asyncio
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, DeliveryMode
from aiormq.abc import DeliveredMessage

from broker.delivery import LEASE_HEADER, Delivery
from broker.outcome import Outcome
from broker.outcomes import OUTCOMES_QUEUE, OutcomeStore
from schemas.progress import PROGRESS_STATUS
from schemas.topology import (
    ATTEMPTS_HEADER,
    CONTENT_TYPE,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    ORIGINAL_USER_HEADER,
    REPLY_UNDELIVERABLE,
    SOURCE_QUEUE_HEADER,
    STATUS_HEADER,
    UNDELIVERED_REPLY_HEADER,
)

# RabbitMQ's direct reply-to pseudo queue. RabbitMQ 3.10 answers a mandatory publish to it
# with a basic.return even when it delivered the reply, so those replies go non-mandatory.
DIRECT_REPLY_PREFIX = "amq.rabbitmq.reply-to"
PERSISTENT = int(DeliveryMode.PERSISTENT)
# Dead-letter codes of Swarm's own, beyond the reply error codes: the reply never arrived.
_PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "message_id",
    "timestamp",
    "type",
    "app_id",
)


class Publisher:
    def __init__(
        self, channel: AbstractChannel, results: AbstractExchange, dead: AbstractExchange
    ) -> None:
        self._channel = channel
        self._default = channel.default_exchange
        self._results = results
        self._dead = dead
        self._records = RecordBatcher(self._default)

    async def publish_outcome(
        self, delivery: Delivery, outcome: Outcome, record: bytes | None = None
    ) -> None:
        """Publish the reply (to `reply_to` and `swarm.results`), the outcome `record` (to the
        outcome stream) and, for errors, the dead letter; return once RabbitMQ confirmed them
        all. Raises on a nack or a lost channel."""
        # Straight to aiormq on this hot path: aio-pika's Message objects cost the daemon
        # more CPU than the frames themselves (one properties object per publish, since
        # aiormq fills in a missing message_id on the one it is given).
        channel = await self._channel.get_underlay_channel()
        correlation_id = delivery.correlation_id or outcome.task_id
        body = outcome.reply_body

        headers: dict[str, Any] = {STATUS_HEADER: outcome.status}
        if outcome.trace_headers:
            headers.update(outcome.trace_headers)

        def properties() -> aiormq.spec.Basic.Properties:
            return aiormq.spec.Basic.Properties(
                content_type=CONTENT_TYPE,
                correlation_id=correlation_id,
                headers=headers,
                delivery_mode=PERSISTENT,
            )

        sends: list[Any] = [
            channel.basic_publish(
                body,
                exchange=self._results.name,
                routing_key=f"{outcome.routing_type}.{outcome.status}",
                properties=properties(),
                mandatory=False,
            )
        ]
        reply_to = delivery.reply_to
        if reply_to is not None:
            direct = reply_to.startswith(DIRECT_REPLY_PREFIX)
            sends.append(
                channel.basic_publish(
                    body,
                    exchange="",
                    routing_key=reply_to,
                    properties=properties(),
                    mandatory=not direct,
                )
            )
        if record is not None:
            sends.append(self._records.append(record))
        confirmed = await asyncio.gather(*sends)
        returned = reply_to is not None and isinstance(confirmed[1], DeliveredMessage)
        if not (outcome.dead_letter or returned):
            return
        code = outcome.error_code if outcome.dead_letter else REPLY_UNDELIVERABLE
        message = outcome.error_message or ""
        extra: dict[str, Any] = {}
        if returned:
            extra[UNDELIVERED_REPLY_HEADER] = reply_to
            message = message or f"reply to {reply_to!r} was returned: no such queue"
        await self._publish_dead(delivery, outcome, code, message, extra)

    async def publish_progress(self, delivery: Delivery, body: bytes) -> None:
        """A progress message to `reply_to`: transient and not mandatory (best effort)."""
        assert delivery.reply_to is not None
        channel = await self._channel.get_underlay_channel()
        await channel.basic_publish(
            body,
            exchange="",
            routing_key=delivery.reply_to,
            properties=aiormq.spec.Basic.Properties(
                content_type=CONTENT_TYPE,
                correlation_id=delivery.correlation_id or delivery.message_id,
                headers={STATUS_HEADER: PROGRESS_STATUS},
                delivery_mode=1,
            ),
            mandatory=False,
        )

    async def republish(self, delivery: Delivery, lease: str) -> None:
        """A copy of the task message, unchanged but for the lease header, on its own queue."""
        properties = {
            name: delivery.properties[name]
            for name in _PROPERTY_NAMES
            if delivery.properties.get(name) is not None
        }
        headers = dict(delivery.properties.get("headers") or {})
        headers[LEASE_HEADER] = lease
        copy = aio_pika.Message(delivery.body, headers=headers, **properties)
        await self._default.publish(copy, delivery.queue, mandatory=False)

    async def _publish_dead(
        self,
        delivery: Delivery,
        outcome: Outcome,
        code: str | None,
        message: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        properties = {
            name: delivery.properties[name]
            for name in _PROPERTY_NAMES
            if delivery.properties.get(name) is not None
        }
        if "message_id" not in properties and outcome.task_id is not None:
            properties["message_id"] = outcome.task_id
        headers = dict(delivery.properties.get("headers") or {})
        headers.update(
            {
                ERROR_CODE_HEADER: code or "",
                ERROR_MESSAGE_HEADER: message[:4096],
                SOURCE_QUEUE_HEADER: delivery.queue,
                ATTEMPTS_HEADER: outcome.attempts,
            }
        )
        if delivery.properties.get("user_id"):
            headers[ORIGINAL_USER_HEADER] = delivery.properties["user_id"]
        headers.update(extra or {})
        letter = aio_pika.Message(delivery.body, headers=headers, **properties)
        await self._dead.publish(letter, "", mandatory=False)


class RecordBatcher:
    """Outcome records appended in the same turn of the event loop go to the stream as one
    message, confirmed once: each record is a persistent stream write, and at saturation one
    per task cost RabbitMQ a third of the daemon's throughput. Every caller still returns
    only once its own record is confirmed."""

    def __init__(self, exchange: AbstractExchange) -> None:
        self._exchange = exchange
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def append(self, record: bytes) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.ensure_future(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[bytes, "asyncio.Future[None]"]]) -> None:
        records = [record for record, _ in batch]
        body = records[0] if len(records) == 1 else OutcomeStore.batch_record(records)
        try:
            await self._exchange.publish(
                aio_pika.Message(body, delivery_mode=DeliveryMode.PERSISTENT),
                OUTCOMES_QUEUE,
                mandatory=False,
            )
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for _, future in batch:
            if not future.done():
                future.set_result(None)
