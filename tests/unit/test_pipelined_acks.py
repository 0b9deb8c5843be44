"""Acknowledgements on the hot path (broker/amqp/pipelined.py `Acks`): one loop turn's acks are one
write, a `multiple=True` ack over the contiguous settled prefix, the rest one by one; never an
ack of a delivery that is still being processed, never one RabbitMQ would call unknown."""

import asyncio
from dataclasses import dataclass

import pamqp.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec

from broker.amqp.acks import Acks
from broker.amqp.turn_writer import TurnWriter


@dataclass
class Tagged:
    delivery_tag: int


class StubChannel:
    """aiormq's channel as Acks sees it: its number, whether it closed, and RabbitMQ's close
    (the event aiormq sets before `is_closed` turns true)."""

    number = 3

    def __init__(self) -> None:
        self.is_closed = False
        self._Channel__close_event = asyncio.Event()


def frames(payloads: list[bytes]) -> list[tuple[str, int, bool]]:
    """(method, delivery_tag, multiple) of each frame written, in order."""
    out = []
    for payload in payloads:
        data = payload
        while data:
            used, channel, frame = pamqp.frame.unmarshal(data)
            assert channel == StubChannel.number
            data = data[used:]
            if isinstance(frame, spec.Basic.Ack):
                out.append(("ack", frame.delivery_tag, frame.multiple))
            else:
                assert isinstance(frame, spec.Basic.Nack) and frame.requeue
                out.append(("nack", frame.delivery_tag, frame.multiple))
    return out


def acks_on(channel: StubChannel) -> tuple[Acks, asyncio.Queue[object]]:
    queue: asyncio.Queue[object] = asyncio.Queue()
    return Acks(channel, TurnWriter(queue)), queue  # type: ignore[arg-type]


def written(queue: asyncio.Queue[object]) -> list[bytes]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait().payload)  # type: ignore[attr-defined]
    return out


async def a_turn() -> None:
    # Acks flush on the next turn, the writer on the one after.
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_turns_acks_of_the_oldest_deliveries_are_one_multiple_ack() -> None:
    acks, queue = acks_on(StubChannel())
    for tag in range(1, 6):
        acks.delivered(tag)
    for tag in (2, 1, 3):
        acks.ack(Tagged(tag))
    await a_turn()
    payloads = written(queue)
    assert len(payloads) == 1  # one socket write
    assert frames(payloads) == [("ack", 3, True)]


async def test_acks_behind_a_delivery_still_running_go_one_by_one() -> None:
    acks, queue = acks_on(StubChannel())
    for tag in range(1, 5):
        acks.delivered(tag)
    acks.ack(Tagged(2))
    acks.ack(Tagged(3))
    await a_turn()
    assert sorted(frames(written(queue))) == [("ack", 2, False), ("ack", 3, False)]
    acks.ack(Tagged(1))  # the prefix now reaches past 2 and 3, already acked
    await a_turn()
    assert frames(written(queue)) == [("ack", 1, True)]
    acks.ack(Tagged(4))
    await a_turn()
    assert frames(written(queue)) == [("ack", 4, True)]


async def test_a_requeue_goes_after_the_acks_asked_before_it_and_is_never_covered() -> None:
    acks, queue = acks_on(StubChannel())
    for tag in range(1, 4):
        acks.delivered(tag)
    acks.ack(Tagged(1))
    acks.requeue(Tagged(2))
    acks.ack(Tagged(3))
    await a_turn()
    assert frames(written(queue)) == [("ack", 1, True), ("nack", 2, False), ("ack", 3, True)]


@pytest.mark.parametrize("how", ["closed", "close_frame_received"])
async def test_nothing_is_written_for_a_channel_that_closed(how: str) -> None:
    """Nor after RabbitMQ's Channel.Close was read: a frame after our CloseOk would make
    RabbitMQ close the whole connection."""
    channel = StubChannel()
    acks, queue = acks_on(channel)
    acks.delivered(1)
    acks.delivered(2)
    if how == "closed":
        channel.is_closed = True
    else:
        channel._Channel__close_event.set()
    acks.ack(Tagged(1))
    acks.requeue(Tagged(2))
    await a_turn()
    assert written(queue) == []


async def test_a_long_held_delivery_costs_single_acks_behind_it_not_memory() -> None:
    acks, queue = acks_on(StubChannel())
    for tag in range(1, 10_002):
        acks.delivered(tag)
    for tag in range(2, 10_002):
        acks.ack(Tagged(tag))
    await a_turn()
    sent = frames(written(queue))
    assert len(sent) == 10_000 and all(not multiple for _, _, multiple in sent)
    assert len(acks._unsettled) == 1  # only the held one is remembered
    acks.ack(Tagged(1))
    await a_turn()
    assert frames(written(queue)) == [("ack", 1, True)]
    assert not acks._unsettled


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_order_of_settling_acks_each_delivery_once_and_only_once_settled(
    data: st.DataObject,
) -> None:
    """Deliveries arrive, are settled (ack or requeue) in any order and any grouping into
    turns, some never: replayed against RabbitMQ's rules for unacked tags, every frame names
    an unacked tag, and exactly the settled deliveries end acked or requeued."""
    count = data.draw(st.integers(1, 40))
    order = data.draw(st.permutations(range(1, count + 1)))
    never = set(data.draw(st.lists(st.sampled_from(order), max_size=count // 3)))
    requeued = set(data.draw(st.lists(st.sampled_from(order), max_size=count // 3))) - never
    cuts = sorted(data.draw(st.lists(st.integers(0, count), max_size=8)))

    left: list[int] = []

    async def run() -> list[tuple[str, int, bool]]:
        acks, queue = acks_on(StubChannel())
        for tag in range(1, count + 1):
            acks.delivered(tag)
        settled_order = [tag for tag in order if tag not in never]
        for index, tag in enumerate(settled_order):
            if index in cuts:
                await a_turn()
            (acks.requeue if tag in requeued else acks.ack)(Tagged(tag))
        await a_turn()
        left.extend(acks._unsettled)  # memory: only what is still unsettled
        return frames(written(queue))

    unacked = set(range(1, count + 1))
    acked: set[int] = set()
    nacked: set[int] = set()
    for method, tag, multiple in asyncio.run(run()):
        assert tag in unacked, f"{method} of {tag}, not unacked: RabbitMQ closes the channel"
        covered = {t for t in unacked if t <= tag} if multiple else {tag}
        assert not covered & never, f"{method} {tag} covers a delivery still being processed"
        unacked -= covered
        (acked if method == "ack" else nacked).update(covered)
    assert nacked == requeued
    assert acked == set(range(1, count + 1)) - never - requeued
    assert unacked == never
    assert set(left) == never
