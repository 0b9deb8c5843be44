"""Acknowledgements and requeues of one consume channel, written by Swarm on the hot path.

Why: aio-pika acks each message with a frame and a socket write of its own. Here a loop
turn's acks go out in one write (broker/amqp/turn_writer.py), as one `multiple=True` ack for
those below the oldest delivery still unsettled and the rest one by one; at the daemon's rate
that is most of the acks' cost gone (docs/performance.md).
"""

import asyncio
from typing import Protocol

import aiormq
import pamqp.frame
from pamqp import commands as spec

from broker.amqp.channel_closing import close_event
from broker.amqp.turn_writer import TurnWriter

_marshal = pamqp.frame.marshal


class Delivered(Protocol):
    @property
    def delivery_tag(self) -> int | None: ...


class Acks:
    """Acknowledgements and requeues of one consume channel (see the module). Every delivery
    on the channel is announced with `delivered`, in the order they came (Deliveries does it,
    first thing, in the reader's step), before it is settled.

    Only unsettled deliveries are remembered (bounded by what is in flight): a turn's acks
    below the oldest unsettled delivery are one `multiple=True` ack, which covers exactly
    them on RabbitMQ's side (everything older is settled already); those above it go singly.
    A delivery held for minutes (a long task) costs single acks behind it, never memory."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, writer: TurnWriter) -> None:
        self.channel = channel
        self._closing = close_event(channel)
        self._writer = writer
        self._number = channel.number
        # In delivery order (tags only grow on a channel): the oldest is the first key.
        self._unsettled: dict[int, None] = {}
        self._to_ack: list[int] = []
        self._scheduled = False
        self.multiple_acks = 0
        self.single_acks = 0

    def delivered(self, tag: int) -> None:
        self._unsettled[tag] = None

    @property
    def open(self) -> bool:
        return not self.channel.is_closed and not self._closing.is_set()

    def ack(self, message: Delivered) -> None:
        """Queued for this turn's write; dropped when the channel is gone (RabbitMQ
        redelivers the message, and the redelivery is answered from the outcome store)."""
        if not self.open:
            return
        tag = message.delivery_tag
        assert tag is not None
        self._to_ack.append(tag)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def requeue(self, message: Delivered) -> None:
        tag = message.delivery_tag
        assert tag is not None
        self.requeue_tag(tag)

    def requeue_tag(self, tag: int, *, requeue: bool = True) -> None:
        """A nack, after the acks asked before it; `requeue=False` rejects it (a task queue
        dead-letters it to swarm.dead)."""
        if not self.open:
            return
        self._flush()
        self._unsettled.pop(tag, None)
        self._writer.write(
            _marshal(
                spec.Basic.Nack(delivery_tag=tag, multiple=False, requeue=requeue), self._number
            )
        )

    def _flush(self) -> None:
        self._scheduled = False
        if not self._to_ack:
            return
        to_ack, self._to_ack = self._to_ack, []
        if not self.open:
            return
        unsettled = self._unsettled
        for tag in to_ack:
            unsettled.pop(tag, None)
        oldest = next(iter(unsettled), None)
        below = [tag for tag in to_ack if oldest is None or tag < oldest]
        parts: list[bytes] = []
        if below:
            self.multiple_acks += 1
            parts.append(
                _marshal(spec.Basic.Ack(delivery_tag=max(below), multiple=True), self._number)
            )
        for tag in to_ack:
            if oldest is not None and tag > oldest:
                self.single_acks += 1
                parts.append(
                    _marshal(spec.Basic.Ack(delivery_tag=tag, multiple=False), self._number)
                )
        self._writer.write(b"".join(parts))
