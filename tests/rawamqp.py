"""A raw AMQP 0-9-1 client on a plain asyncio socket, for tests that must send what no client
library would: a content header given as bytes (property flags and values, a hand-built header
table), so that undecodable properties reach the daemon exactly as a hostile producer sends them.
The routing key may be any bytes too: with a `CC` header RabbitMQ routes such a message to a
queue and delivers it under that key.

It also consumes without decoding properties: a delivery comes back as its property bytes and
body, which is how a test reads dead letters that carry such properties without tripping over
them itself. pamqp marshals and unmarshals the other method frames; content headers and
Basic.Publish are built by hand. One channel, publisher confirms, no heartbeats; calls are
sequential.
"""

import asyncio
import contextlib
import struct
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pamqp import commands, frame
from pamqp.base import Frame

FRAME_METHOD, FRAME_HEADER, FRAME_BODY = 1, 2, 3
FRAME_END = b"\xce"
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
CHANNEL = 1
MAX_FRAME = 131072
BASIC_CLASS_ID = 60
BASIC_PUBLISH_ID = 40

# Basic's property flags, in wire order (AMQP 0-9-1, 4.2.6.1 and the class's field list).
PROPERTY_FLAGS = {
    "content_type": 1 << 15,
    "content_encoding": 1 << 14,
    "headers": 1 << 13,
    "delivery_mode": 1 << 12,
    "priority": 1 << 11,
    "correlation_id": 1 << 10,
    "reply_to": 1 << 9,
    "expiration": 1 << 8,
    "message_id": 1 << 7,
    "timestamp": 1 << 6,
    "type": 1 << 5,
    "user_id": 1 << 4,
    "app_id": 1 << 3,
    "cluster_id": 1 << 2,
}
OCTET_PROPERTIES = ("delivery_mode", "priority")


# --- hand-built encodings -------------------------------------------------------------------


def shortstr(value: bytes) -> bytes:
    if len(value) > 255:
        raise ValueError("a shortstr holds at most 255 bytes")
    return bytes([len(value)]) + value


def longstr(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def table(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A field table (with its length prefix) from (key bytes, encoded field value) pairs;
    keys are taken as bytes, so they may be anything a shortstr can hold."""
    return longstr(b"".join(shortstr(key) + value for key, value in entries))


def array(values: Iterable[bytes]) -> bytes:
    """A field array's payload (with its length prefix) from encoded field values."""
    return longstr(b"".join(values))


def properties(**fields: bytes | int) -> bytes:
    """Property flags and values, in wire order. Short strings are given as raw bytes (the
    length is added), `headers` as a whole encoded table (see `table`), `delivery_mode` and
    `priority` as ints, `timestamp` as an int (the unsigned 64-bit value)."""
    unknown = set(fields) - set(PROPERTY_FLAGS)
    if unknown:
        raise ValueError(f"not Basic properties: {sorted(unknown)}")
    flags = 0
    values = []
    for name, flag in PROPERTY_FLAGS.items():
        if name not in fields:
            continue
        flags |= flag
        value = fields[name]
        if name in OCTET_PROPERTIES:
            assert isinstance(value, int)
            values.append(bytes([value]))
        elif name == "timestamp":
            assert isinstance(value, int)
            values.append(struct.pack(">Q", value))
        elif name == "headers":
            assert isinstance(value, bytes)
            values.append(value)
        else:
            assert isinstance(value, bytes)
            values.append(shortstr(value))
    return struct.pack(">H", flags) + b"".join(values)


def publish_method(exchange: bytes, routing_key: bytes, mandatory: bool) -> bytes:
    """Basic.Publish's payload, by hand so that the routing key may be any bytes (pamqp
    takes a str): class and method ids, a reserved short, two short strings, the bits."""
    return (
        struct.pack(">HHH", BASIC_CLASS_ID, BASIC_PUBLISH_ID, 0)
        + shortstr(exchange)
        + shortstr(routing_key)
        + bytes([1 if mandatory else 0])
    )


def content_header(body_size: int, property_bytes: bytes) -> bytes:
    """A content header frame's payload: class, weight, body size, then flags and values."""
    return struct.pack(">HHQ", BASIC_CLASS_ID, 0, body_size) + property_bytes


# --- the client -----------------------------------------------------------------------------


class Refused(Exception):
    """RabbitMQ closed the channel or the connection: it would not take what was sent."""


class Unroutable(Exception):
    """RabbitMQ returned a mandatory publish: no queue was bound for it."""


@dataclass(frozen=True)
class RawMessage:
    """A delivery as it arrived: routing key, property bytes (flags and values), body."""

    routing_key: str
    properties: bytes
    body: bytes


class RawInbox:
    """Deliveries of one raw consumer, with a way to await them (no sleeps)."""

    def __init__(self) -> None:
        self.messages: list[RawMessage] = []
        self._arrived = asyncio.Event()

    def _add(self, message: RawMessage) -> None:
        self.messages.append(message)
        self._arrived.set()

    async def wait_until(
        self, done: Callable[[list[RawMessage]], bool], timeout_s: float = 60.0
    ) -> None:
        async def until() -> None:
            while not done(self.messages):
                self._arrived.clear()
                await self._arrived.wait()

        await asyncio.wait_for(until(), timeout_s)

    def with_body(self, body: bytes) -> list[RawMessage]:
        return [message for message in self.messages if message.body == body]


@dataclass
class _Content:
    """A message being assembled from its method, content header and body frames."""

    method: Frame
    properties: bytes = b""
    size: int = -1
    body: bytes = b""


class RawAmqp:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._frame_max = MAX_FRAME
        self._replies: asyncio.Queue[Frame | Exception] = asyncio.Queue()
        self._confirms: dict[int, asyncio.Future[None]] = {}
        self._next_tag = 1
        self._returned = False
        self._content: _Content | None = None
        self._consumers: dict[str, RawInbox] = {}
        self._closed: Exception | None = None
        self._reading: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str) -> "RawAmqp":
        """Handshake with PLAIN auth on the URL's vhost, open channel 1 in confirm mode."""
        parts = urllib.parse.urlsplit(url)
        vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 5672)
        client = cls(reader, writer)
        writer.write(PROTOCOL_HEADER)
        start = await client._read_method()
        assert isinstance(start, commands.Connection.Start), start
        user = urllib.parse.unquote(parts.username or "guest")
        password = urllib.parse.unquote(parts.password or "guest")
        client._send(
            commands.Connection.StartOk(
                client_properties={"connection_name": "swarm-test-rawamqp"},
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
            ),
            channel=0,
        )
        tune = await client._read_method()
        assert isinstance(tune, commands.Connection.Tune), tune
        client._frame_max = min(tune.frame_max or MAX_FRAME, MAX_FRAME)
        client._send(
            commands.Connection.TuneOk(
                channel_max=tune.channel_max, frame_max=client._frame_max, heartbeat=0
            ),
            channel=0,
        )
        client._send(commands.Connection.Open(virtual_host=vhost), channel=0)
        opened = await client._read_method()
        if not isinstance(opened, commands.Connection.OpenOk):
            raise Refused(f"connection refused: {opened!r}")
        client._reading = asyncio.create_task(client._read_forever())
        await client._call(commands.Channel.Open(), commands.Channel.OpenOk)
        await client._call(commands.Confirm.Select(), commands.Confirm.SelectOk)
        return client

    async def close(self) -> None:
        if self._closed is None:
            with contextlib.suppress(Exception):
                self._send(commands.Connection.Close(reply_code=200, reply_text="bye"), 0)
                await asyncio.wait_for(self._replies.get(), 5)
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(BaseException):
                await self._reading
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def __aenter__(self) -> "RawAmqp":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- what tests call

    async def publish(
        self,
        exchange: str,
        routing_key: str | bytes,
        property_bytes: bytes,
        body: bytes,
        *,
        mandatory: bool = True,
    ) -> None:
        """Publish with the given property bytes; return once RabbitMQ confirmed it. Raises
        Unroutable when a mandatory publish came back, Refused when RabbitMQ closed on it."""
        self._check_open()
        tag = self._next_tag
        self._next_tag += 1
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirms[tag] = confirmed
        self._returned = False
        key = routing_key.encode() if isinstance(routing_key, str) else routing_key
        frames = [_frame(FRAME_METHOD, publish_method(exchange.encode(), key, mandatory))]
        frames.append(_frame(FRAME_HEADER, content_header(len(body), property_bytes)))
        chunk = self._frame_max - 8
        frames.extend(_frame(FRAME_BODY, body[i : i + chunk]) for i in range(0, len(body), chunk))
        self._writer.write(b"".join(frames))
        await self._writer.drain()
        await confirmed
        if self._returned:
            raise Unroutable(f"{exchange!r}/{routing_key!r} reached no queue")

    async def declare_queue(self, name: str = "", *, exclusive: bool = True) -> str:
        ok = await self._call(
            commands.Queue.Declare(queue=name, exclusive=exclusive, auto_delete=exclusive),
            commands.Queue.DeclareOk,
        )
        assert isinstance(ok, commands.Queue.DeclareOk)
        return str(ok.queue)

    async def bind(self, queue: str, exchange: str, routing_key: str = "") -> None:
        await self._call(
            commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=routing_key),
            commands.Queue.BindOk,
        )

    async def consume(self, queue: str) -> RawInbox:
        """Consume without acks; deliveries arrive in the returned inbox, undecoded."""
        ok = await self._call(
            commands.Basic.Consume(queue=queue, no_ack=True), commands.Basic.ConsumeOk
        )
        assert isinstance(ok, commands.Basic.ConsumeOk)
        inbox = RawInbox()
        self._consumers[str(ok.consumer_tag)] = inbox
        return inbox

    async def watch(self, exchange: str, routing_key: str = "") -> RawInbox:
        """A private queue bound to `exchange`, consumed raw (e.g. the `swarm.dead` fanout)."""
        queue = await self.declare_queue()
        await self.bind(queue, exchange, routing_key)
        return await self.consume(queue)

    # --- frames

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed

    def _send(self, method: Frame, channel: int = CHANNEL) -> None:
        self._writer.write(frame.marshal(method, channel))

    async def _call(self, method: Frame, expected: type[Frame]) -> Frame:
        self._check_open()
        self._send(method)
        reply = await self._replies.get()
        if isinstance(reply, Exception):
            raise reply
        assert isinstance(reply, expected), reply
        return reply

    async def _read_frame(self) -> tuple[int, int, bytes]:
        head = await self._reader.readexactly(7)
        kind, channel, size = struct.unpack(">BHI", head)
        payload = await self._reader.readexactly(size + 1)
        if payload[-1:] != FRAME_END:
            raise Refused("frame without its end marker")
        return kind, channel, payload[:-1]

    async def _read_method(self) -> Frame:
        kind, _, payload = await self._read_frame()
        assert kind == FRAME_METHOD, kind
        return _method(payload)

    async def _read_forever(self) -> None:
        try:
            while True:
                kind, _, payload = await self._read_frame()
                if kind == FRAME_METHOD:
                    self._on_method(_method(payload))
                elif kind == FRAME_HEADER and self._content is not None:
                    self._content.size = struct.unpack_from(">Q", payload, 4)[0]
                    self._content.properties = payload[12:]
                    self._content_done()
                elif kind == FRAME_BODY and self._content is not None:
                    self._content.body += payload
                    self._content_done()
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._fail(Refused(f"connection lost: {exc!r}"))
        except Exception as exc:  # e.g. a close whose reply_text pamqp cannot decode
            self._fail(Refused(f"unreadable frame from RabbitMQ: {exc!r}"))

    def _on_method(self, method: Frame) -> None:
        if isinstance(method, commands.Basic.Deliver | commands.Basic.Return):
            self._content = _Content(method)
        elif isinstance(method, commands.Basic.Ack | commands.Basic.Nack):
            for tag in [t for t in self._confirms if t <= method.delivery_tag or t == 0]:
                future = self._confirms.pop(tag)
                if isinstance(method, commands.Basic.Nack):
                    future.set_exception(Refused(f"publish {tag} nacked"))
                else:
                    future.set_result(None)
        elif isinstance(method, commands.Channel.Close | commands.Connection.Close):
            self._fail(Refused(f"{method.reply_code} {method.reply_text}"))
            closed_ok = (
                commands.Channel.CloseOk()
                if isinstance(method, commands.Channel.Close)
                else commands.Connection.CloseOk()
            )
            with contextlib.suppress(Exception):
                self._send(closed_ok, CHANNEL if isinstance(method, commands.Channel.Close) else 0)
        else:
            self._replies.put_nowait(method)

    def _content_done(self) -> None:
        content = self._content
        assert content is not None
        if content.size < 0 or len(content.body) < content.size:
            return
        self._content = None
        if isinstance(content.method, commands.Basic.Return):
            self._returned = True
            return
        assert isinstance(content.method, commands.Basic.Deliver)
        inbox = self._consumers.get(str(content.method.consumer_tag))
        if inbox is not None:
            inbox._add(
                RawMessage(str(content.method.routing_key), content.properties, content.body)
            )

    def _fail(self, exc: Exception) -> None:
        self._closed = exc
        for future in self._confirms.values():
            if not future.done():
                future.set_exception(exc)
        self._confirms.clear()
        self._replies.put_nowait(exc)


def _frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, CHANNEL, len(payload)) + payload + FRAME_END


def _method(payload: bytes) -> Frame:
    """Unmarshal a method frame's payload with pamqp (method frames only, never headers)."""
    whole = struct.pack(">BHI", FRAME_METHOD, 0, len(payload)) + payload + FRAME_END
    _, _, method = frame.unmarshal(whole)
    assert isinstance(method, Frame), method
    return method
