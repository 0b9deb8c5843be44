"""Settling a delivery is a state machine (broker/tasks/settlement.py): the legal paths say what
RabbitMQ hears, and an illegal call (a second ack, a requeue after an ack) raises instead of
passing unseen. The ingress's own settlement (AMQP) included, and the paths the daemon takes."""

import asyncio
from typing import Any

import pytest
from processor_harness import RecordingSettlement, make_harness, until
from processor_harness import delivery as make_delivery

from broker.amqp.incoming import AmqpSettlement
from broker.amqp.ingress import Ingress
from broker.amqp.outcomes import OutcomeStore
from broker.errors import BrokerError, SettlementError
from broker.tasks.settlement import SettleState


class FakeMessage:
    """An aio-pika message as AmqpSettlement sees it: the body it lets go of, and the acks
    and requeues its channel's `Acks` sent for it."""

    def __init__(self) -> None:
        self.body = b"body"
        self.calls: list[str] = []


class RecordingAcks:
    """broker/amqp/pipelined.py's `Acks`, recording what would go on the wire."""

    def ack(self, message: FakeMessage) -> None:
        message.calls.append("ack")

    def requeue(self, message: FakeMessage) -> None:
        message.calls.append("nack(requeue=True)")


def settlement_of(message: FakeMessage) -> AmqpSettlement:
    return AmqpSettlement(message, RecordingAcks())  # type: ignore[arg-type]


async def test_a_second_ack_raises_and_reaches_rabbitmq_once() -> None:
    message = FakeMessage()
    settlement = settlement_of(message)
    await settlement.ack()
    with pytest.raises(SettlementError) as raised:
        await settlement.ack()
    assert isinstance(raised.value, BrokerError)
    assert (raised.value.state, raised.value.action) == ("acked", "ack")
    assert message.calls == ["ack"]


async def test_a_requeue_after_an_ack_raises() -> None:
    message = FakeMessage()
    settlement = settlement_of(message)
    await settlement.ack()
    with pytest.raises(SettlementError):
        await settlement.requeue()
    assert message.calls == ["ack"]


async def test_an_ack_after_a_requeue_raises() -> None:
    message = FakeMessage()
    settlement = settlement_of(message)
    await settlement.requeue()
    with pytest.raises(SettlementError):
        await settlement.ack()
    assert message.calls == ["nack(requeue=True)"]


async def test_a_held_delivery_lets_go_of_its_body_and_is_settled_once() -> None:
    message = FakeMessage()
    settlement = settlement_of(message)
    settlement.hold()
    assert settlement.state is SettleState.HELD and message.body == b""
    with pytest.raises(SettlementError):
        settlement.hold()
    await settlement.ack()
    with pytest.raises(SettlementError):
        await settlement.requeue()
    assert message.calls == ["ack"]


@pytest.mark.parametrize("end", ["ack", "requeue"])
async def test_a_renewed_delivery_is_acked_once_and_its_end_is_silent(end: str) -> None:
    settlement = RecordingSettlement()
    await settlement.renewed()
    assert settlement.state is SettleState.REPLACED and settlement.sent == ["ack"]
    with pytest.raises(SettlementError):
        await settlement.renewed()
    await getattr(settlement, end)()
    assert settlement.sent == ["ack"] and settlement.settled
    with pytest.raises(SettlementError):
        await settlement.ack()


async def test_a_settled_delivery_cannot_be_held() -> None:
    settlement = RecordingSettlement()
    await settlement.ack()
    with pytest.raises(SettlementError):
        settlement.hold()


def _ingress(store: OutcomeStore, process: Any) -> Ingress:
    """An ingress that never connects: its _handle driven directly, publishing faked."""
    ingress = Ingress("amqp://unused/", 1, process, process, store, lambda outcome: None)

    async def publish(*_: object) -> None:
        pass

    ingress._publish = publish  # type: ignore[method-assign]
    return ingress


async def test_the_ingress_settles_a_renewed_long_task_and_its_held_copies() -> None:
    harness = make_harness(lease_renew_s=0.02)
    processor, pools = harness.processor, harness.pools
    ingress = _ingress(harness.store, processor.process)
    ingress._on_settled = processor.settled
    first = make_delivery("state-1")
    handling = asyncio.create_task(ingress._handle(first, processor.process))
    await pools.runs_started(1)
    again = make_delivery("state-1", redelivered=True)
    await ingress._handle(again, processor.process)  # held: returns at once
    await until(lambda: len(harness.renewals) >= 3)
    pools.release.set()
    await handling
    await asyncio.sleep(0.01)
    original, held = first.settle_token, again.settle_token
    assert isinstance(original, RecordingSettlement) and isinstance(held, RecordingSettlement)
    assert original.sent == ["ack"] and original.state is SettleState.ACKED
    assert held.sent == ["ack"] and held.state is SettleState.ACKED


async def test_the_ingress_requeues_a_delivery_whose_processing_failed() -> None:
    async def failing(_: object) -> Any:
        raise RuntimeError("processing failed")

    ingress = _ingress(OutcomeStore(retention_s=60), failing)
    failed = make_delivery("state-2")
    await ingress._handle(failed, failing)
    token = failed.settle_token
    assert isinstance(token, RecordingSettlement) and token.sent == ["requeue"]
