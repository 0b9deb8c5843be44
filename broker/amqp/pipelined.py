"""The daemon's hot path for publishes: a confirm channel that Swarm frames and settles itself.

Why: aiormq (under aio-pika) holds a channel lock across each publish until its writer task
has written and drained that one message, builds a future per frame, writes each frame
with a socket write of its own, and answers a `multiple=True` confirm by walking every
outstanding tag and scheduling a callback for each. At the daemon's rate that was a third
of its event loop (the profile in docs/performance.md).

What stays aiormq's: the connection, its reader and writer tasks, heartbeats, channel
open/close and returned messages (`basic.return`, matched by message_id as aiormq does).
What is Swarm's, one concept per module:

- `PipelinedChannel` (here): a confirm channel owned by this path alone (nothing else
  publishes on it, so its delivery tags are ours to count): `publish` frames the message
  (broker/amqp/publish_framing.py, split at `frame_max`), registers its confirm and returns
  the future, with no await; a confirm, `multiple` or not, settles its tags in one pass over a
  deque; when the channel closes, every pending confirm fails with its reason.
- `TurnWriter` (broker/amqp/turn_writer.py): frames handed to it during one turn of the loop
  go to aiormq's write queue as one payload, so the writer task makes one socket write for
  all of them, in order.
- `Acks` (broker/amqp/acks.py): acknowledgements of one consume channel, sent as one
  `multiple=True` ack for those below the oldest delivery still unsettled, the rest one by
  one, in the same write.
- `Deliveries` (broker/amqp/deliveries.py): each delivery of a consume channel handed to its
  consumer, a plain function, in the reader's own step.
"""

import asyncio
from collections import deque
from random import getrandbits
from typing import Any

import aiormq
from aiormq.channel import Returning
from pamqp import commands as spec

from broker.amqp.channel_closing import close_event
from broker.amqp.publish_framing import publish_frames
from broker.amqp.turn_writer import TurnWriter


class PipelinedChannel:
    """A publisher-confirm channel that only this object publishes on (see the module)."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, writer: TurnWriter) -> None:
        assert isinstance(channel, aiormq.Channel) and channel.publisher_confirms
        self._channel = channel
        self._writer = writer
        self._number = channel.number
        # frame_max 0 (no limit) makes aiormq's max_content_size negative: no limit here too.
        self._max_body = max(0, channel.max_content_size)
        self._tags: deque[int] = deque()
        self._closing = close_event(channel)
        self._loop = asyncio.get_running_loop()
        # Confirms come to us: aiormq's reader calls the channel's `_on_confirm_frame`.
        channel._on_confirm_frame = self._on_confirm  # type: ignore[method-assign,assignment]
        # Our futures are plain ones (aiormq's cost a set entry and a callback each): when the
        # channel closes, the pending ones are failed here, with the channel's reason.
        channel.closing.add_done_callback(self._closed)

    @property
    def frame_max(self) -> int:
        return int(self._channel.connection.connection_tune.frame_max)

    def publish(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        properties: aiormq.spec.Basic.Properties,
        mandatory: bool,
    ) -> "asyncio.Future[Any]":
        """Frame and queue the message; the future is the confirm: the `Basic.Ack` frame,
        the returned `DeliveredMessage` (mandatory and unroutable), or DeliveryError on a
        nack; the channel's close rejects it."""
        channel = self._channel
        if channel.is_closed or self._closing.is_set():
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        if not properties.message_id:
            # A returned message is matched to its publish by message_id (aiormq's rule).
            properties.message_id = f"{getrandbits(128):032x}"
        # Framed before the tag is counted: a publish that cannot be framed (a name over 255
        # bytes, a header value pamqp cannot write) raises here and takes no sequence number.
        frames = publish_frames(
            self._number, self._max_body, body, exchange, routing_key, properties, mandatory
        )
        channel.delivery_tag += 1
        tag = channel.delivery_tag
        confirm = self._loop.create_future()
        channel.confirmations[tag] = confirm
        self._tags.append(tag)
        if mandatory:
            message_id = properties.message_id
            by_id = channel.message_id_delivery_tag
            by_id[message_id] = tag
            confirm.add_done_callback(lambda _: by_id.pop(message_id, None))
        self._writer.write(frames)
        return confirm

    def _closed(self, closing: "asyncio.Future[Any]") -> None:
        reason: BaseException | None = None
        if not closing.cancelled():
            reason = closing.exception()
        confirmations = self._channel.confirmations
        while self._tags:
            confirm = confirmations.pop(self._tags.popleft(), None)
            if isinstance(confirm, asyncio.Future) and not confirm.done():
                confirm.set_exception(
                    reason or aiormq.exceptions.ChannelInvalidStateError("channel closed")
                )
                confirm.exception()  # retrieved: a caller that stopped waiting logs nothing

    async def _on_confirm(self, frame: spec.Basic.Ack | spec.Basic.Nack) -> None:
        confirmations = self._channel.confirmations
        tags = self._tags
        last = frame.delivery_tag
        if frame.multiple:
            while tags and tags[0] <= last:
                _settle(confirmations.pop(tags.popleft(), None), frame)
        else:
            _settle(confirmations.pop(last, None), frame)
            while tags and tags[0] not in confirmations:
                tags.popleft()


def _settle(confirm: Any, frame: spec.Basic.Ack | spec.Basic.Nack) -> None:
    # A returned message's confirm was resolved by aiormq with the message, and replaced by
    # its `Returning` marker (a future nobody awaits); a cancelled publish's future is done.
    if isinstance(confirm, Returning) or not isinstance(confirm, asyncio.Future):
        return
    if confirm.done():
        return
    if isinstance(frame, spec.Basic.Ack):
        confirm.set_result(frame)
    else:
        confirm.set_exception(aiormq.exceptions.DeliveryError(None, frame))
