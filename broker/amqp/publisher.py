"""Publishing outcomes with publisher confirms: the reply, its copy, and the dead letter."""

import asyncio
import contextlib
import time
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, DeliveryMode
from aiormq.abc import DeliveredMessage

from broker.amqp.dead_letter import build_dead_letter, kept_properties, original_entries
from broker.amqp.field_table import encode_entry, table_bytes
from broker.amqp.frame_fit import (
    EncodedHeadersProperties,
    fit_shortstr,
    properties_budget,
    properties_size,
    reply_headers,
    reply_properties_for,
)
from broker.amqp.outcomes import OUTCOMES_QUEUE, OutcomeStore
from broker.amqp.pipelined import PipelinedChannel
from broker.amqp.publish_results import (
    REFUSED,
    RETURNED,
    DeadLetterReason,
    DeadLetterRefused,
    ReplyResult,
    is_nack,
)
from broker.amqp.renewable_channel import RenewableChannel
from broker.tasks.delivery import LEASE_HEADER, Delivery
from broker.tasks.outcome import Outcome
from schemas.progress import PROGRESS_STATUS
from schemas.topology import (
    ATTEMPTS_HEADER,
    CONTENT_TYPE,
    DEAD_LETTERED_AT_HEADER,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    SOURCE_QUEUE_HEADER,
    STATUS_HEADER,
    TRACEBACK_HEADER,
    TRUNCATED_HEADER,
)

# RabbitMQ's direct reply-to pseudo queue. RabbitMQ 3.10 answers a mandatory publish to it
# with a basic.return even when it delivered the reply, so those replies go non-mandatory.
DIRECT_REPLY_PREFIX = "amq.rabbitmq.reply-to"


class LeaseCopyTooLarge(ValueError):
    """The task's message cannot be copied unchanged with a lease header."""


class Publisher:
    def __init__(
        self,
        channel: AbstractChannel,
        pipelined: PipelinedChannel,
        results: AbstractExchange,
        dead: AbstractExchange,
    ) -> None:
        self._channel = channel
        self._pipelined = pipelined
        self._results = results
        self._dead = dead
        self._records = RecordBatcher(pipelined)
        self._dead_channel = RenewableChannel(self._open_confirm_channel)
        # Replies sent again after a refusal: a channel a quorum queue refused on may keep
        # refusing (broker/amqp/renewable_channel.py), so each refusal renews this one.
        self._resend_channel = RenewableChannel(self._open_confirm_channel)

    async def publish_reply(
        self,
        delivery: Delivery,
        outcome: Outcome,
        record: bytes | None = None,
        *,
        stripped: bool = False,
    ) -> ReplyResult:
        """Publish the reply to `reply_to` and its copy to `swarm.results` (and `record` to
        the outcome stream, when given) in parallel; return once RabbitMQ confirmed them all.
        A reply `reply_to` returned or refused, and a copy a queue bound to swarm.results
        refused, are reported, not raised: the caller dead-letters the reply and counts the
        copy. Raises on a lost channel, or when the record is nacked.
        `stripped` leaves the trace headers out (the last line of defence)."""
        # The hot path: framed by broker/amqp/pipelined.py, no await until the confirms.
        pipelined = self._pipelined
        budget = properties_budget(pipelined.frame_max)
        correlation_id, headers, dropped = self._reply_headers(delivery, outcome, stripped, budget)

        def properties() -> aiormq.spec.Basic.Properties:
            # One each: aiormq writes the message_id it fills in onto the object it is given.
            return reply_properties_for(correlation_id, headers)

        body = outcome.reply_body
        sends: list[Any] = [
            pipelined.publish(
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
                pipelined.publish(
                    body,
                    exchange="",
                    routing_key=reply_to,
                    properties=properties(),
                    mandatory=not direct,
                )
            )
        if record is not None:
            sends.append(self._records.append(record))
        confirmed = await asyncio.gather(*sends, return_exceptions=True)
        copy = confirmed[0]
        reply = confirmed[1] if reply_to is not None else None
        # Nacks of the reply and of its copy are outcomes, not failures: publishing them
        # again would duplicate them in every queue that took them.
        refused = [
            result
            for result in (copy, reply)
            if isinstance(result, aiormq.exceptions.DeliveryError) and is_nack(result)
        ]
        for result in confirmed:
            if isinstance(result, BaseException) and not any(result is r for r in refused):
                raise result
        undelivered = None
        if isinstance(reply, DeliveredMessage):
            undelivered = RETURNED
        elif reply is not None and any(reply is r for r in refused):
            undelivered = REFUSED
        copy_refused = any(copy is r for r in refused)
        return ReplyResult(undelivered, tuple(dropped), copy_refused=copy_refused)

    async def resend_reply(
        self, delivery: Delivery, outcome: Outcome, *, stripped: bool
    ) -> str | None:
        """The reply alone to `reply_to` again (confirmed), after a refusal: its copy and record
        went out with the first try. None once RabbitMQ took it, else REFUSED (a nack again)
        or RETURNED (the queue has gone meanwhile)."""
        assert delivery.reply_to is not None
        async with self._resend_channel.use() as channel:
            budget = properties_budget(channel.connection.connection_tune.frame_max)
            correlation_id, headers, _ = self._reply_headers(delivery, outcome, stripped, budget)
            try:
                confirmation = await channel.basic_publish(
                    outcome.reply_body,
                    exchange="",
                    routing_key=delivery.reply_to,
                    properties=reply_properties_for(correlation_id, headers),
                    mandatory=True,
                )
            except aiormq.exceptions.DeliveryError as exc:
                if not is_nack(exc):
                    raise
                self._resend_channel.renew(channel)
                return REFUSED
        return RETURNED if isinstance(confirmation, DeliveredMessage) else None

    @staticmethod
    def _reply_headers(
        delivery: Delivery, outcome: Outcome, stripped: bool, budget: int
    ) -> tuple[str | None, dict[str, Any], list[str]]:
        """The reply's correlation id and headers made to fit `budget`, and what was dropped."""
        wanted_id = delivery.correlation_id or outcome.task_id
        correlation_id = fit_shortstr(wanted_id)
        headers: dict[str, Any] = {STATUS_HEADER: outcome.status}
        if outcome.trace_headers and not stripped:
            headers.update(outcome.trace_headers)
        headers, dropped = reply_headers(correlation_id, headers, budget)
        if correlation_id != wanted_id:
            dropped = ["correlation_id", *dropped]
            headers = {**headers, TRUNCATED_HEADER: ",".join(dropped)}
        return correlation_id, headers, dropped

    async def append_record(self, record: bytes) -> None:
        """The outcome record alone (confirmed): after a dead letter, see the ingress."""
        await self._records.append(record)

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
        """A copy of the task message, unchanged but for the lease header, on its own queue
        (confirmed). Its header entries are copied byte for byte, as a dead letter's are:
        a decoded table cannot always be encoded again. Raises LeaseCopyTooLarge when the
        copy would not fit one content-header frame (the task is then held, not renewed)."""
        channel = await self._channel.get_underlay_channel()
        dropped: list[str] = []
        properties = kept_properties(delivery, None, False, dropped)
        lease_key = LEASE_HEADER.encode()
        entries = [e for e in original_entries(delivery, dropped) if e[0] != lease_key]
        entries.append(encode_entry(LEASE_HEADER, lease))
        copy = EncodedHeadersProperties(table_bytes(entries), **properties)
        budget = properties_budget(channel.connection.connection_tune.frame_max)
        if dropped or properties_size(copy) > budget:
            raise LeaseCopyTooLarge(
                "a renewal copy cannot carry the task unchanged"
                + (f" (cannot copy {', '.join(dropped)})" if dropped else " (over frame_max)")
            )
        # A nack raises aiormq's DeliveryError: the lease is then not renewed this time.
        await channel.basic_publish(
            delivery.body, exchange="", routing_key=delivery.queue, properties=copy
        )

    async def publish_dead_letter(
        self, delivery: Delivery, outcome: Outcome, reason: DeadLetterReason, *, stripped: bool
    ) -> tuple[str, ...]:
        """The task's dead letter to `swarm.dead` (confirmed), made to fit the frame size
        (broker/amqp/dead_letter.py); returns what was cut. Raises DeadLetterRefused on a nack.
        Sent on a channel of its own (broker/amqp/renewable_channel.py says why)."""
        swarm_headers: dict[str, Any] = {
            ERROR_CODE_HEADER: reason.code,
            ERROR_MESSAGE_HEADER: reason.message,
            SOURCE_QUEUE_HEADER: delivery.queue,
            ATTEMPTS_HEADER: outcome.attempts,
            DEAD_LETTERED_AT_HEADER: int(time.time()),
            **reason.extra,
        }
        if outcome.traceback:
            swarm_headers[TRACEBACK_HEADER] = outcome.traceback
        async with self._dead_channel.use() as channel:
            budget = properties_budget(channel.connection.connection_tune.frame_max)
            letter = build_dead_letter(
                delivery, outcome.task_id, swarm_headers, budget, stripped=stripped
            )
            try:
                await channel.basic_publish(
                    letter.body,
                    exchange=self._dead.name,
                    routing_key="",
                    properties=letter.properties,
                    mandatory=False,
                )
            except aiormq.exceptions.DeliveryError as exc:
                if not is_nack(exc):
                    raise
                self._dead_channel.renew(channel)
                raise DeadLetterRefused(f"{self._dead.name} refused the dead letter") from exc
            except aiormq.exceptions.AMQPChannelError:
                # RabbitMQ closed the channel (swarm.dead deleted, a permission): closing the
                # main channel too rebuilds the session, which declares the topology again,
                # as when this happened on the main channel itself.
                with contextlib.suppress(Exception):
                    await self._channel.close()
                raise
        return letter.truncated

    async def _open_confirm_channel(self) -> aiormq.abc.AbstractChannel:
        underlay = await self._channel.get_underlay_channel()
        # A publish RabbitMQ returns (mandatory, no queue) resolves to the returned message.
        return await underlay.connection.channel(publisher_confirms=True, on_return_raises=False)


# A batch of records is one stream message, and RabbitMQ closes the channel on a message over
# its max_message_size (128 MiB by default): batches stop at this many bytes, and a record
# that large goes alone (one record is at most SWARM_OUTCOME_MAX_REPLY_MB, 120 at most).
BATCH_MAX_BYTES = 64 * 1024 * 1024

Pending = tuple[bytes, "asyncio.Future[None]"]


def split_batches(pending: list[Pending], max_bytes: int) -> list[list[Pending]]:
    """Consecutive records grouped into batches of at most `max_bytes` (a larger record is a
    batch of its own), in order."""
    batches: list[list[Pending]] = []
    size = 0
    for item in pending:
        if not batches or size + len(item[0]) > max_bytes:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += len(item[0])
    return batches


class RecordBatcher:
    """Outcome records appended in the same turn of the event loop go to the stream as one
    message, confirmed once: each record is a persistent stream write, and at saturation one
    per task cost RabbitMQ a third of the daemon's throughput. Every caller still returns
    only once its own record is confirmed."""

    def __init__(self, pipelined: PipelinedChannel) -> None:
        self._pipelined = pipelined
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def append(self, record: bytes) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for batch in split_batches(pending, BATCH_MAX_BYTES):
            task = asyncio.ensure_future(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[bytes, "asyncio.Future[None]"]]) -> None:
        records = [record for record, _ in batch]
        body = records[0] if len(records) == 1 else OutcomeStore.batch_record(records)
        try:
            await self._pipelined.publish(
                body,
                exchange="",
                routing_key=OUTCOMES_QUEUE,
                properties=aiormq.spec.Basic.Properties(delivery_mode=DeliveryMode.PERSISTENT),
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
