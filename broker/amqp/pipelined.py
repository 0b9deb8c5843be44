"""The daemon's hot path on the wire: publishes and acknowledgements framed by Swarm, written
without waiting, one socket write per turn of the event loop, confirms settled as integers.

Why: aiormq (under aio-pika) holds a channel lock across each publish until its writer task
has written and drained that one message, builds a future per frame, writes each frame
with a socket write of its own, and answers a `multiple=True` confirm by walking every
outstanding tag and scheduling a callback for each. At the daemon's rate that was a third
of its event loop (the profile in docs/performance.md).

What stays aiormq's: the connection, its reader and writer tasks, heartbeats, channel
open/close and returned messages (`basic.return`, matched by message_id as aiormq does).
What is Swarm's:

- `TurnWriter`: frames handed to it during one turn of the loop go to aiormq's write queue
  as one payload, so the writer task makes one socket write for all of them, in order.
- `PipelinedChannel`: a confirm channel owned by this path alone (nothing else publishes on
  it, so its delivery tags are ours to count): `publish` frames the message (split at
  `frame_max`), registers its confirm and returns the future, with no await; a confirm,
  `multiple` or not, settles its tags in one pass over a deque; when the channel closes,
  every pending confirm fails with its reason.
- `Acks`: acknowledgements of one consume channel, sent as one `multiple=True` ack for those
  below the oldest delivery still unsettled, the rest one by one, in the same write.
- `Deliveries`: each delivery of a consume channel handed to its consumer, a plain function,
  in the reader's own step. aiormq starts a task per delivery and aio-pika a second one; the
  ingress starts its own anyway, and that one is now the only one.
"""

import asyncio
import struct
from collections import deque
from collections.abc import Callable
from random import getrandbits
from typing import Any, Protocol

import aiormq
import pamqp.frame
import structlog
from aio_pika.message import IncomingMessage
from aiormq.abc import ChannelFrame, DeliveredMessage
from aiormq.channel import Returning
from pamqp import commands as spec

log = structlog.get_logger("swarm.pipelined")

_marshal = pamqp.frame.marshal
_FRAME_END = b"\xce"
# Frame header: type, channel, payload size. Method payload head: Basic (60), Publish (40),
# the reserved short.
_FRAME_HEAD = struct.Struct(">BHI")
_PUBLISH_HEAD = struct.Struct(">HHH").pack(60, 40, 0)
_CONTENT_HEAD = struct.Struct(">HHQ")
_METHOD, _HEADER, _BODY = 1, 2, 3


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_HEAD.pack(kind, channel, len(payload)) + payload + _FRAME_END


def _shortstr(value: str) -> bytes:
    encoded = value.encode()
    if len(encoded) > 255:
        raise ValueError(f"{value[:40]!r}... is longer than an AMQP short string (255 bytes)")
    return bytes((len(encoded),)) + encoded


def publish_frames(
    channel: int,
    max_body: int,
    body: bytes,
    exchange: str,
    routing_key: str,
    properties: aiormq.spec.Basic.Properties,
    mandatory: bool,
) -> bytes:
    """The frames of one basic.publish, as pamqp writes them (tests/unit compare the two),
    without pamqp's per-frame validation and objects: this runs for every reply. Body frames
    carry at most `max_body` bytes each (0 or less: no limit, RabbitMQ's frame_max 0)."""
    method = _PUBLISH_HEAD + _shortstr(exchange) + _shortstr(routing_key)
    method += b"\x01" if mandatory else b"\x00"
    size = len(body)
    parts: list[bytes | memoryview] = [
        _frame(_METHOD, channel, method),
        _frame(_HEADER, channel, _CONTENT_HEAD.pack(60, 0, size) + properties.marshal()),
    ]
    step = max_body if max_body > 0 else max(size, 1)
    view = memoryview(body)
    for start in range(0, size, step):
        chunk = view[start : start + step]
        # Slices of the body go into the one join: the body is copied once here.
        parts += (_FRAME_HEAD.pack(_BODY, channel, len(chunk)), chunk, _FRAME_END)
    return b"".join(parts)


# Bytes handed to aiormq's writer without waiting for the socket; past them a write waits
# until the socket took them (a slow link, RabbitMQ's connection.blocked), and what comes
# meanwhile is held here, so memory stays bounded by in-flight deliveries, not by the link.
DRAIN_AFTER_BYTES = 4 * 1024 * 1024


class TurnWriter:
    """One connection's frames, a loop turn's worth per write (see the module)."""

    def __init__(self, write_queue: "asyncio.Queue[ChannelFrame]") -> None:
        self._queue = write_queue
        self._parts: list[bytes] = []
        self._scheduled = False
        self._undrained = 0
        # Waiting for room in aiormq's bounded write queue, or for the socket to take a
        # large write; later frames wait behind it, in order.
        self._putting: asyncio.Task[None] | None = None
        self.writes = 0

    def write(self, payload: bytes) -> None:
        self._parts.append(payload)
        if not self._scheduled and self._putting is None:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._parts or self._putting is not None:
            return
        payload = b"".join(self._parts)
        self._parts = []
        self.writes += 1
        self._undrained += len(payload)
        drained: asyncio.Future[None] | None = None
        if self._undrained >= DRAIN_AFTER_BYTES:
            self._undrained = 0
            drained = asyncio.get_running_loop().create_future()
        frame = ChannelFrame(payload=payload, should_close=False, drain_future=drained)
        if drained is None:
            try:
                self._queue.put_nowait(frame)
                return
            except asyncio.QueueFull:
                pass
        self._putting = asyncio.ensure_future(self._put(frame, drained))

    async def _put(self, frame: ChannelFrame, drained: "asyncio.Future[None] | None") -> None:
        try:
            await self._queue.put(frame)
            if drained is not None:
                await drained
        finally:
            self._putting = None
        if self._parts:
            self._flush()

    async def drain(self) -> None:
        """Until everything handed over so far is written to the socket (at a clean close:
        the last turn's acks). Only while the connection is open: its writer must run."""
        while self._putting is not None:
            await asyncio.shield(self._putting)
        self._flush()
        while self._putting is not None:
            await asyncio.shield(self._putting)
        drained = asyncio.get_running_loop().create_future()
        await self._queue.put(ChannelFrame(payload=b"", should_close=False, drain_future=drained))
        await drained

    def close(self) -> None:
        if self._putting is not None:
            self._putting.cancel()
        self._parts = []


def _close_event(channel: aiormq.abc.AbstractChannel) -> asyncio.Event:
    """Set when RabbitMQ closed the channel, before `is_closed` turns true: a frame sent after
    our CloseOk makes RabbitMQ close the whole connection (504), so nothing goes then."""
    event = getattr(channel, "_Channel__close_event", None)
    if not isinstance(event, asyncio.Event):
        raise RuntimeError("aiormq's channel changed: broker/amqp/pipelined.py needs updating")
    return event


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
        self._closing = _close_event(channel)
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
        self._closing = _close_event(channel)
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


Consumer = Callable[[IncomingMessage], None]


class Deliveries:
    """Consumers of one consume channel (see the module). A consumer is called with aio-pika's
    IncomingMessage (its reading of the properties is the one the daemon has always used)
    and must not block: it starts what the delivery needs and returns."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, acks: Acks) -> None:
        # aiormq's own steps for a delivery, minus its task: read the content header and
        # body frames that follow the Deliver frame. Checked here, loudly, once per channel.
        read_header = getattr(channel, "_Channel__get_content_header", None)
        read_content = getattr(channel, "_read_content", None)
        if read_header is None or read_content is None or not hasattr(channel, "_on_deliver_frame"):
            raise RuntimeError("aiormq's channel changed: broker/amqp/pipelined.py needs updating")
        self._channel = channel
        self._acks = acks
        self._read_header = read_header
        self._read_content = read_content
        self._consumers: dict[str, Consumer] = {}
        channel._on_deliver_frame = self._on_deliver

    async def consume(self, queue: str, consumer: Consumer) -> str:
        tag = f"swarm.{self._channel.number}.{getrandbits(64):016x}"
        self._consumers[tag] = consumer
        try:
            await self._channel.basic_consume(queue, _not_called, consumer_tag=tag)
        except BaseException:
            self._consumers.pop(tag, None)
            raise
        return tag

    async def cancel(self, tag: str) -> None:
        # Deliveries RabbitMQ sent before its CancelOk still reach the consumer: frames are
        # read in order, and it is forgotten only after.
        await self._channel.basic_cancel(tag)
        self._consumers.pop(tag, None)

    async def _on_deliver(self, frame: spec.Basic.Deliver) -> None:
        header = await self._read_header()
        message: DeliveredMessage = await self._read_content(frame, header)
        tag = frame.delivery_tag
        assert tag is not None
        # Announced before anything can fail: a delivery the acks do not know of could be
        # covered by a later multiple ack without ever having been processed.
        self._acks.delivered(tag)
        consumer = self._consumers.get(frame.consumer_tag or "")
        if consumer is None:
            # Its consumer was cancelled (by us, or by RabbitMQ when the queue went): back to
            # the queue, for whoever consumes it next.
            log.warning("delivery_for_unknown_consumer", consumer_tag=frame.consumer_tag)
            self._acks.requeue_tag(tag)
            return
        try:
            consumer(IncomingMessage(message, no_ack=False))
        except Exception:
            # The reader must go on: a consumer's bug costs this delivery, never the
            # connection. Rejected, not requeued (it would come straight back): a task queue
            # dead-letters it to swarm.dead.
            log.exception("consumer_failed", consumer_tag=frame.consumer_tag)
            self._acks.requeue_tag(tag, requeue=False)


async def _not_called(message: DeliveredMessage) -> None:
    raise AssertionError("deliveries go through Deliveries._on_deliver")
