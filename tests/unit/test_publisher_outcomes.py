"""broker.amqp.publisher, broker.amqp.outcome_publishing and broker.amqp.publish_results: the
outcome record batcher, replies RabbitMQ returned or refused and the dead letters they call for,
nacks of every kind, and publishes cut off by lost connections. The real Publisher and
OutcomePublishing on RabbitMQ in memory (tests/unit/fakes), whose confirms each test sets."""

import asyncio
import dataclasses
from collections.abc import Awaitable, Iterable

import aiormq
import pytest
from fakes.server import MemoryBroker, Published, failing, nack, returned
from fakes.swarm import REPLY_QUEUE, delivery, task_body

import broker.amqp.outcome_publishing
import broker.amqp.publisher
from broker.amqp.outcome_publishing import MAX_LOST_SESSIONS, OutcomePublishing, PublishAbandoned
from broker.amqp.outcomes import OUTCOMES_QUEUE, OutcomeStore
from broker.amqp.publish_stats import PublishStats
from broker.amqp.session import AmqpSession
from broker.errors import Rejection
from broker.tasks.outcome import Outcome, rejected, succeeded
from schemas.codec import decode, encode
from schemas.topology import (
    DEAD_EXCHANGE,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    REPLY_UNDELIVERABLE,
    RESULTS_EXCHANGE,
    UNDELIVERED_REPLY_HEADER,
)


class Outcomes:
    """OutcomePublishing on the memory broker's current session, as the ingress keeps it."""

    def __init__(self, broker: MemoryBroker, session: AmqpSession) -> None:
        self.broker = broker
        self.session = session
        self.ready = asyncio.Event()
        self.ready.set()
        self.stats = PublishStats()
        # A refused reply is sent again once (0.2 s later) before it is dead-lettered.
        self.publishing = OutcomePublishing(
            self.ready, lambda: self.session, self.stats, refused_reply_retry_s=0.5
        )

    async def reconnect(self) -> None:
        """The connection drops; the ingress opens the next session."""
        self.ready.clear()
        self.broker.connection.lose()
        assert self.session.lost.is_set()
        self.session = await self.broker.open_session()
        self.ready.set()


@pytest.fixture
async def memory() -> MemoryBroker:
    return MemoryBroker(queues=[REPLY_QUEUE])


@pytest.fixture
async def outcomes(memory: MemoryBroker) -> Outcomes:
    return Outcomes(memory, await memory.open_session())


def ok_outcome(task_id: str = "t") -> Outcome:
    return succeeded(
        task_id,
        "data_processing",
        encode("result"),
        attempts=1,
        pool="cpu",
        node="n1",
        queued_ms=0.0,
        run_ms=1.0,
    )


def error_outcome(task_id: str = "t") -> Outcome:
    return rejected(Rejection("handler_error", "it failed", task_id), "data_processing", attempts=1)


def record_of(outcome: Outcome) -> bytes:
    assert outcome.task_id is not None
    record = OutcomeStore(3600).outcome_record(outcome.task_id, outcome.status, outcome.reply_body)
    assert record is not None
    return record


async def settle_all(appends: Iterable[Awaitable[None]]) -> list[BaseException | None]:
    """Each append's result, or what it raised; fails if one never returns."""
    gathered = asyncio.gather(*appends, return_exceptions=True)
    return list(await asyncio.wait_for(gathered, 5.0))


def kinds(memory: MemoryBroker) -> list[str]:
    """The publishes so far, by what they were: reply, copy, record, dead letter."""

    def kind(p: Published) -> str:
        if p.exchange == RESULTS_EXCHANGE:
            return "copy"
        if p.exchange == DEAD_EXCHANGE:
            return "dead letter"
        return "record" if p.routing_key == OUTCOMES_QUEUE else "reply"

    return [kind(p) for p in memory.published]


# == The record batcher =========================================================================


async def test_records_appended_in_one_turn_go_as_one_stream_message_confirmed_once(
    memory: MemoryBroker, outcomes: Outcomes
) -> None:
    publisher = outcomes.session.publisher
    held = memory.hold(routing_key=OUTCOMES_QUEUE)
    appends = [asyncio.create_task(publisher.append_record(r)) for r in (b"r1", b"r2", b"r3")]
    await held.wait_entered()
    assert not any(a.done() for a in appends)  # none returns before the confirm

    held.release()
    await asyncio.wait_for(asyncio.gather(*appends), 5.0)
    assert len(memory.to(routing_key=OUTCOMES_QUEUE)) == 1
    assert memory.stream == [OutcomeStore.batch_record([b"r1", b"r2", b"r3"])]

    await publisher.append_record(b"r4")  # a later turn: a message of its own
    assert memory.stream[1:] == [b"r4"]


async def test_a_failed_batch_fails_every_record_it_carried(
    memory: MemoryBroker, outcomes: Outcomes
) -> None:
    memory.on_publish(failing(RuntimeError("stream gone")), routing_key=OUTCOMES_QUEUE)
    publisher = outcomes.session.publisher
    results = await settle_all(publisher.append_record(r) for r in (b"r1", b"r2", b"r3"))
    assert [type(r) for r in results] == [RuntimeError] * 3
    assert len(memory.to(routing_key=OUTCOMES_QUEUE)) == 1


async def test_a_batch_over_the_size_limit_is_split_and_a_refusal_fails_only_its_part(
    memory: MemoryBroker, outcomes: Outcomes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker.amqp.publisher, "BATCH_MAX_BYTES", 10)
    memory.on_publish(nack, routing_key=OUTCOMES_QUEUE, times=1)  # the first batch only
    publisher = outcomes.session.publisher
    records = [b"a" * 4, b"b" * 4, b"c" * 4]  # [a, b] fit 10 bytes, c goes on its own
    results = await settle_all(publisher.append_record(r) for r in records)
    assert isinstance(results[0], aiormq.exceptions.DeliveryError)
    assert results[1] is results[0]
    assert results[2] is None
    assert memory.stream == [b"c" * 4]
    assert [p.confirm for p in memory.to(routing_key=OUTCOMES_QUEUE)] == ["nack", "ack"]


# == Replies returned or refused, and their dead letters ========================================


async def test_a_returned_reply_of_an_ok_outcome_is_dead_lettered_as_undeliverable(
    memory: MemoryBroker, outcomes: Outcomes
) -> None:
    outcome = ok_outcome()
    record = record_of(outcome)
    await outcomes.publishing.publish(delivery(task_body("t"), reply_to="gone"), outcome, record)
    (letter,) = memory.to(exchange=DEAD_EXCHANGE)
    assert letter.headers[ERROR_CODE_HEADER] == REPLY_UNDELIVERABLE
    assert letter.headers[UNDELIVERED_REPLY_HEADER] == "gone"
    assert "no such queue" in letter.headers[ERROR_MESSAGE_HEADER]
    assert [p.confirm for p in memory.to(routing_key="gone")] == ["returned"]
    # An ok outcome's record goes with its reply (one round trip), before the dead letter.
    assert kinds(memory) == ["copy", "reply", "record", "dead letter"]
    assert memory.stream == [record]


async def test_a_returned_reply_of_a_failed_task_gives_one_dead_letter_then_the_record(
    memory: MemoryBroker, outcomes: Outcomes
) -> None:
    outcome = error_outcome()
    record = record_of(outcome)
    held = memory.hold(exchange=DEAD_EXCHANGE)
    publishing = asyncio.create_task(
        outcomes.publishing.publish(delivery(task_body("t"), reply_to="gone"), outcome, record)
    )
    await held.wait_entered()
    assert memory.stream == []  # the record waits for the dead letter's confirm
    held.release()
    await publishing

    (letter,) = memory.to(exchange=DEAD_EXCHANGE)
    assert letter.headers[ERROR_CODE_HEADER] == "handler_error"  # its own code, not the reply's
    assert letter.headers[UNDELIVERED_REPLY_HEADER] == "gone"
    assert kinds(memory) == ["copy", "reply", "dead letter", "record"]
    assert memory.stream == [record]


async def test_a_reply_to_direct_reply_to_is_not_mandatory(
    memory: MemoryBroker, outcomes: Outcomes
) -> None:
    reply_to = "amq.rabbitmq.reply-to.g1h2AA"
    await outcomes.publishing.publish(
        delivery(task_body("t"), reply_to=reply_to), ok_outcome(), None
    )
    (reply,) = memory.to(routing_key=reply_to)
    assert not reply.mandatory
    assert memory.to(exchange=DEAD_EXCHANGE) == []


async def test_a_reply_its_queue_refuses_is_counted_and_dead_lettered(
    memory: MemoryBroker, outcomes: Outcomes
) -> None:
    memory.on_publish(nack, routing_key=REPLY_QUEUE)
    await outcomes.publishing.publish(delivery(task_body("t")), ok_outcome(), None)
    assert outcomes.stats.replies_refused == 1
    (letter,) = memory.to(exchange=DEAD_EXCHANGE)
    assert letter.headers[ERROR_CODE_HEADER] == REPLY_UNDELIVERABLE
    assert "refused" in letter.headers[ERROR_MESSAGE_HEADER]
    assert letter.headers[UNDELIVERED_REPLY_HEADER] == REPLY_QUEUE
    assert len(memory.to(routing_key=REPLY_QUEUE)) == 2  # refused, sent again, refused
    assert outcomes.stats.replies_resent == 1
    assert len(memory.to(exchange=RESULTS_EXCHANGE)) == 1  # the copy went out once


async def test_a_refused_reply_taken_when_sent_again_is_neither_counted_nor_dead_lettered(
    memory: MemoryBroker, outcomes: Outcomes
) -> None:
    memory.on_publish(nack, routing_key=REPLY_QUEUE, times=1)  # a leader election, say
    await outcomes.publishing.publish(delivery(task_body("t")), ok_outcome(), None)
    assert (outcomes.stats.replies_resent, outcomes.stats.replies_refused) == (1, 0)
    assert memory.to(exchange=DEAD_EXCHANGE) == []
    (reply,) = memory.queue(REPLY_QUEUE).delivered
    assert decode(reply.body)["status"] == "ok"
    assert len(memory.to(exchange=RESULTS_EXCHANGE)) == 1


async def test_a_refused_reply_whose_queue_goes_meanwhile_is_dead_lettered_as_returned(
    memory: MemoryBroker, outcomes: Outcomes
) -> None:
    memory.on_publish(nack, routing_key=REPLY_QUEUE, times=1)
    memory.on_publish(returned, routing_key=REPLY_QUEUE, times=1)
    await outcomes.publishing.publish(delivery(task_body("t")), ok_outcome(), None)
    assert outcomes.stats.replies_refused == 0
    (letter,) = memory.to(exchange=DEAD_EXCHANGE)
    assert letter.headers[ERROR_CODE_HEADER] == REPLY_UNDELIVERABLE
    assert "returned" in letter.headers[ERROR_MESSAGE_HEADER]


async def test_a_copy_swarm_results_refuses_is_counted_not_sent_again_nor_dead_lettered(
    memory: MemoryBroker, outcomes: Outcomes
) -> None:
    memory.on_publish(nack, exchange=RESULTS_EXCHANGE)
    await outcomes.publishing.publish(delivery(task_body("t")), ok_outcome(), None)
    assert outcomes.stats.results_copies_refused == 1
    assert len(memory.to(exchange=RESULTS_EXCHANGE)) == 1
    assert memory.to(exchange=DEAD_EXCHANGE) == []
    assert decode(memory.queue(REPLY_QUEUE).delivered[0].body)["status"] == "ok"


async def test_a_refused_record_fails_the_publish_so_the_task_is_not_acked(
    memory: MemoryBroker, outcomes: Outcomes
) -> None:
    memory.on_publish(nack, routing_key=OUTCOMES_QUEUE)
    outcome = ok_outcome()
    with pytest.raises(aiormq.exceptions.DeliveryError):
        await outcomes.publishing.publish(delivery(task_body("t")), outcome, record_of(outcome))
    assert memory.stream == []


async def test_a_refused_dead_letter_is_sent_again_on_a_new_channel_until_taken(
    memory: MemoryBroker, outcomes: Outcomes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker.amqp.outcome_publishing, "DEAD_LETTER_RETRY_FIRST_S", 0.0)
    memory.on_publish(nack, exchange=DEAD_EXCHANGE, times=1)
    held = memory.hold(exchange=DEAD_EXCHANGE)
    outcome = error_outcome()
    record = record_of(outcome)
    publishing = asyncio.create_task(
        outcomes.publishing.publish(delivery(task_body("t")), outcome, record)
    )
    await held.wait_entered()
    assert outcomes.stats.dead_letters_refused == 1
    assert outcomes.stats.dead_letters_waiting == 1  # the task is held meanwhile
    assert memory.stream == []  # and not recorded: it must not be taken as answered
    held.release()
    await publishing

    first, second = memory.to(exchange=DEAD_EXCHANGE)
    assert (first.confirm, second.confirm) == ("nack", "ack")
    assert second.channel != first.channel  # a refusing channel keeps refusing: not reused
    assert second.body == first.body
    assert outcomes.stats.dead_letters_waiting == 0
    assert memory.stream == [record]


# == Publishes cut off by lost connections ======================================================


async def test_a_reply_cut_off_by_lost_connections_is_resent_then_stripped_then_abandoned(
    memory: MemoryBroker, outcomes: Outcomes
) -> None:
    traced = dataclasses.replace(
        ok_outcome(),
        trace_headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )
    publishing = asyncio.create_task(
        outcomes.publishing.publish(delivery(task_body("t")), traced, None)
    )
    for lost in range(2 * MAX_LOST_SESSIONS):
        held = memory.hold(exchange=RESULTS_EXCHANGE)
        await held.wait_entered()
        (attempt,) = held.entered
        # Trace headers go from the try after MAX_LOST_SESSIONS losses on: the stripped form.
        assert ("traceparent" in attempt.headers) is (lost < MAX_LOST_SESSIONS)
        await outcomes.reconnect()

    with pytest.raises(PublishAbandoned):
        await asyncio.wait_for(publishing, 5.0)
    assert outcomes.stats.stripped == 1
    assert outcomes.stats.abandoned == 1
    assert len(memory.to(exchange=RESULTS_EXCHANGE)) == 2 * MAX_LOST_SESSIONS
