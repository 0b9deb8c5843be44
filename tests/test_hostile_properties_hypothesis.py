"""Generated AMQP properties and header tables, sent as raw frames to one daemon: every field
type of AMQP 0-9-1's tables as RabbitMQ knows them (t b B s u I i l f d D S x A T F V), nested
tables and arrays, keys and strings that are not UTF-8, keys up to 255 bytes, timestamps up to
2^64-1, doubles up to 1e300, empty values; bodies that are valid tasks or garbage; routing keys
that are not UTF-8 (routed by a `CC` header).

The oracle, per message: pamqp's strict decoder (which the daemon tries first) says whether its
properties decode. A message whose properties decode, whose content type is msgpack and whose
body is a task is answered `ok`; any other is answered `error` (`malformed` when the properties
did not decode) and dead-lettered with its body unchanged. Every message gets exactly one reply,
and after all of them the daemon still consumes on its first connection.

Left out because RabbitMQ itself refuses them (the publishing connection is closed with 541
INTERNAL_ERROR, so they never reach a consumer): NaN and infinite doubles and floats, and the
type tag 0x00. `user_id` and `expiration` are left out too: RabbitMQ checks them on publish.
"""

import asyncio
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pamqp.frame
import pytest
from conftest import DaemonFactory
from hardening import Figures, peak_rss_mb
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pamqp import commands
from pamqp.header import ContentHeader
from raw import Inbox, RawProducer, Received, task
from rawamqp import RawAmqp, RawInbox, array, content_header, longstr, properties, table

from broker.amqp.frames import FrameExtras, tolerant_frames
from broker.daemon import Daemon

CONTENT_TYPE = b"application/msgpack"
EXAMPLES = 60
ANSWER_TIMEOUT_S = 60.0

# --- field values, encoded by hand ----------------------------------------------------------


def _tagged(tag: bytes, fmt: str) -> Any:
    return lambda value: tag + struct.pack(fmt, value)


# Timestamps pamqp reads: seconds up to 2^32-1, milliseconds above (to the year 9999).
READABLE_TIMESTAMPS = st.integers(0, 253402300799999)
EDGE_TIMESTAMPS = [0, 2**32 - 1, 2**32, 253402300799, 253402300800 * 1000, 2**63, 2**64 - 1]
NOT_UTF8 = [b"\xff", b"x-k\xffey", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]


@dataclass(frozen=True)
class Fields:
    """The strategies for one flavour of message: `clean` ones draw only what pamqp decodes
    (so that half the messages take the happy path), hostile ones anything RabbitMQ relays."""

    strings: st.SearchStrategy[bytes]
    keys: st.SearchStrategy[bytes]
    timestamps: st.SearchStrategy[int]
    tables: st.SearchStrategy[bytes]
    values: st.SearchStrategy[bytes]


def fields_of(hostile: bool) -> Fields:
    strings = st.text(max_size=24).map(str.encode)
    keys = st.one_of(st.text(max_size=16).map(str.encode), st.just(b"k" * 255), st.just(b""))
    timestamps: st.SearchStrategy[int] = READABLE_TIMESTAMPS
    if hostile:
        strings = st.one_of(strings, st.binary(max_size=48), st.sampled_from(NOT_UTF8))
        keys = st.one_of(keys, st.binary(max_size=24), st.sampled_from([*NOT_UTF8, b"\xff" * 255]))
        timestamps = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from(EDGE_TIMESTAMPS))
    doubles = st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from([1e300, -1e300, 5e-324, -0.0]),
    )
    scalars = st.one_of(
        st.integers(0, 255).map(lambda v: b"t" + bytes([v])),
        st.integers(-(2**7), 2**7 - 1).map(_tagged(b"b", ">b")),
        st.integers(0, 2**8 - 1).map(_tagged(b"B", ">B")),
        st.integers(-(2**15), 2**15 - 1).map(_tagged(b"s", ">h")),
        st.integers(0, 2**16 - 1).map(_tagged(b"u", ">H")),
        st.integers(-(2**31), 2**31 - 1).map(_tagged(b"I", ">i")),
        st.integers(0, 2**32 - 1).map(_tagged(b"i", ">I")),
        st.integers(-(2**63), 2**63 - 1).map(_tagged(b"l", ">q")),
        st.floats(width=32, allow_nan=False, allow_infinity=False).map(_tagged(b"f", ">f")),
        doubles.map(_tagged(b"d", ">d")),
        st.tuples(st.integers(0, 255), st.integers(0, 2**32 - 1)).map(
            lambda d: b"D" + struct.pack(">BI", *d)
        ),
        strings.map(lambda s: b"S" + struct.pack(">I", len(s)) + s),
        st.binary(max_size=48).map(lambda s: b"x" + struct.pack(">I", len(s)) + s),
        timestamps.map(_tagged(b"T", ">Q")),
        st.just(b"V"),
    )
    values = st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4).map(lambda items: b"A" + array(items)),
            st.lists(st.tuples(keys, inner), max_size=4).map(lambda pairs: b"F" + table(pairs)),
        ),
        max_leaves=8,
    )
    tables = st.lists(st.tuples(keys, values), max_size=6).map(table)
    return Fields(strings, keys, timestamps, tables, values)


CLEAN, HOSTILE = fields_of(hostile=False), fields_of(hostile=True)


@dataclass(frozen=True)
class Generated:
    """One message's drawn parts; the harness adds what makes it unique and answerable (a
    fresh correlation_id, the reply queue, a unique body id or a nonce after garbage)."""

    fields: dict[str, bytes | int]
    message_id: bytes | None
    body_args: Any  # a task's args, or None with garbage
    garbage: bytes | None
    # None: routed by the type's own key; else routed by a `CC` header under "x-" + these bytes.
    routing_key: bytes | None = None


@st.composite
def generated(draw: st.DrawFn) -> Generated:
    flavour = draw(st.sampled_from([CLEAN, HOSTILE]))
    optional: dict[str, st.SearchStrategy[Any]] = {
        "content_encoding": flavour.strings,
        "headers": flavour.tables,
        "delivery_mode": st.sampled_from([1, 2]),
        "priority": st.integers(0, 255),
        "timestamp": flavour.timestamps,
        "type": flavour.strings,
        "app_id": flavour.strings,
        "cluster_id": flavour.strings,
    }
    fields: dict[str, bytes | int] = {
        name: draw(strategy) for name, strategy in optional.items() if draw(st.booleans())
    }
    # Three times out of four the right content type, so that bodies get read.
    fields["content_type"] = (
        CONTENT_TYPE
        if draw(st.integers(0, 3))
        else draw(st.just(CONTENT_TYPE + b"\xff") | flavour.strings)
    )
    message_id = draw(st.none() | flavour.strings)
    routing_key = draw(st.none() | flavour.strings)
    number = st.integers(-(2**63), 2**63 - 1)
    if draw(st.integers(0, 2)):  # two bodies of three are tasks
        args = draw(st.none() | number | st.text(max_size=16) | st.lists(number, max_size=8))
        return Generated(fields, message_id, args, None, routing_key)
    return Generated(fields, message_id, None, draw(st.binary(max_size=64)), routing_key)


# --- the harness ----------------------------------------------------------------------------


@dataclass
class Harness:
    """Sends generated messages one at a time and checks each one's fate."""

    daemon: Daemon
    raw: RawAmqp
    replies: Inbox
    dead: RawInbox
    sent: int = 0
    answered: int = 0
    expected_dead: int = 0
    codes: dict[str, int] = field(default_factory=dict)

    async def send_and_check(self, message: Generated) -> None:
        correlation_id = uuid.uuid4().hex
        nonce = uuid.uuid4().hex.encode()
        fields = dict(message.fields)
        fields.update(correlation_id=correlation_id.encode(), reply_to=self.replies.name.encode())
        if message.message_id is not None:
            # Unique, so that no message is answered from another's stored outcome.
            fields["message_id"] = message.message_id + b"-" + nonce
        if message.garbage is None:
            body = msgpack.packb(task(id=f"gen-{nonce.decode()}", args=message.body_args))
        else:
            body = message.garbage + nonce
        routing_key = b"inference"
        if message.routing_key is not None:
            # Never a type's own key ("x-" first), so the CC header alone routes it, once.
            routing_key = b"x-" + message.routing_key
            headers = fields.get("headers", table([]))
            assert isinstance(headers, bytes)
            cc = bytes([2]) + b"CC" + b"A" + array([b"S" + longstr(b"inference")])
            fields["headers"] = longstr(cc + headers[4:])
        property_bytes = properties(**fields)
        decodes = _strict_decodes(len(body), property_bytes)
        ok_expected = decodes and fields["content_type"] == CONTENT_TYPE and message.garbage is None

        await self.raw.publish("swarm.tasks", routing_key, property_bytes, body)
        self.sent += 1

        await self.replies.wait_until(
            lambda received: bool(_replies_to(received, correlation_id)), ANSWER_TIMEOUT_S
        )
        self.answered += 1
        (reply,) = _replies_to(self.replies.messages, correlation_id)
        status = reply.payload["status"]
        code = (reply.payload["error"] or {}).get("code", "")
        kind = f"{code or status}{'' if decodes else ' (undecodable properties)'}"
        self.codes[kind] = self.codes.get(kind, 0) + 1
        if ok_expected:
            assert status == "ok", reply.payload
            return
        assert status == "error", reply.payload
        if not decodes:
            assert code == "malformed", reply.payload
            assert "could not be decoded" in reply.payload["error"]["message"]
        self.expected_dead += 1
        await self.dead.wait_until(
            lambda letters: any(letter.body == body for letter in letters), ANSWER_TIMEOUT_S
        )


def _strict_decodes(body_size: int, property_bytes: bytes) -> bool:
    """Whether pamqp's strict decoder reads these properties (outside the daemon's
    connections pamqp decodes as it always did)."""
    payload = content_header(body_size, property_bytes)
    frame = struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"
    try:
        pamqp.frame.unmarshal(frame)
    except Exception:
        return False
    return True


def _replies_to(received: list[Received], correlation_id: str) -> list[Received]:
    """Final replies (progress messages left out, should a drawn header ask for them)."""
    return [
        r
        for r in received
        if r.message.correlation_id == correlation_id and r.payload.get("status") != "progress"
    ]


@pytest.mark.timeout(300)
async def test_generated_properties_are_answered_or_dead_lettered(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str
) -> None:
    daemon = await start_daemon()
    replies = await producer.inbox()
    loop = asyncio.get_running_loop()
    async with await RawAmqp.connect(amqp_url) as raw:
        harness = Harness(daemon, raw, replies, await raw.watch("swarm.dead"))

        # Hypothesis drives a plain function, on a thread: each example runs its coroutine on
        # this loop, where the daemon lives, and waits for its verdict.
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(message=generated())
        def each_message(message: Generated) -> None:
            verdict = asyncio.run_coroutine_threadsafe(harness.send_and_check(message), loop)
            verdict.result(timeout=2 * ANSWER_TIMEOUT_S)

        await asyncio.to_thread(each_message)
        await harness.dead.wait_until(
            lambda letters: len(letters) >= harness.expected_dead, ANSWER_TIMEOUT_S
        )

    final_replies = [r for r in replies.messages if r.payload.get("status") != "progress"]
    print(f"hypothesis outcomes: {harness.codes}")
    Figures(
        case="properties:hypothesis",
        sent=harness.sent,
        answered=harness.answered,
        lost=harness.sent - harness.answered,
        duplicated=len(final_replies) - harness.answered,
        dead_letters=len(harness.dead.messages),
        peak_rss_mb=peak_rss_mb(),
        ready=daemon.ingress.consuming and daemon.ingress.sessions == 1,
    ).check(dead_letters=harness.expected_dead)


# --- the decoder alone, on what RabbitMQ would not even relay -------------------------------

# Values RabbitMQ refuses (so only the decoder sees them here): NaN and infinities, the 0x00 tag
# pamqp reads as void, a tag nobody knows (the salvage cannot step over it).
unrelayed = st.sampled_from(
    [
        _tagged(b"d", ">d")(float("nan")),
        _tagged(b"d", ">d")(float("-inf")),
        _tagged(b"f", ">f")(float("inf")),
        b"\x00",
        b"Zjunk",
    ]
)
decoder_tables = st.lists(
    st.tuples(HOSTILE.keys, st.one_of(HOSTILE.values, unrelayed)), max_size=6
).map(table)


@settings(max_examples=400, deadline=None, database=None)
@given(
    message=generated(),
    headers=st.none() | decoder_tables,
    body_size=st.integers(0, 2**40),
)
def test_tolerant_decoder_reads_every_generated_header(
    message: Generated, headers: bytes | None, body_size: int
) -> None:
    """Strict where pamqp is, never failing where it is not: the body size and every decodable
    property survive, the raw table is the table as sent, and only a forged-proof marker says
    what failed."""
    fields = dict(message.fields, correlation_id=b"corr", reply_to=b"replies")
    if headers is not None:
        fields["headers"] = headers
    payload = content_header(body_size, properties(**fields))
    frame = struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"
    with tolerant_frames():
        _, _, header = pamqp.frame.unmarshal(frame)
    assert isinstance(header, ContentHeader)
    assert header.body_size == body_size
    extras = header.properties.cluster_id
    if "headers" not in fields and _strict_decodes(body_size, properties(**fields)):
        assert not isinstance(extras, FrameExtras)  # nothing to say: left as it was
        return
    assert isinstance(extras, FrameExtras)
    if "headers" in fields:
        assert extras.raw_headers == fields["headers"][4:]
    assert header.properties.correlation_id == "corr"
    assert header.properties.reply_to == "replies"
    strict_decodes = _strict_decodes(body_size, properties(**fields))
    event(f"strict decode {'succeeds' if strict_decodes else 'fails'}")
    if strict_decodes:
        assert extras.error is None
        _, _, strict = pamqp.frame.unmarshal(frame)
        assert isinstance(strict, ContentHeader)
        assert extras.cluster_id == strict.properties.cluster_id  # the producer's, kept
        for name in strict.properties.__slots__:
            if name != "cluster_id":
                assert repr(getattr(header.properties, name)) == repr(
                    getattr(strict.properties, name)
                ), name
    else:
        assert extras.error


@settings(max_examples=200, deadline=None, database=None)
@given(
    routing_key=HOSTILE.strings,
    consumer_tag=st.text(max_size=32),
    delivery_tag=st.integers(1, 2**63 - 1),  # pamqp reads it signed; tags never reach 2^63
    redelivered=st.booleans(),
)
def test_tolerant_decoder_reads_any_routing_key(
    routing_key: bytes, consumer_tag: str, delivery_tag: int, redelivered: bool
) -> None:
    """A Basic.Deliver reads whatever its routing key holds: escaped when not UTF-8, every
    other field as sent."""
    payload = (
        struct.pack(">HH", 60, 60)
        + bytes([len(consumer_tag.encode())])
        + consumer_tag.encode()
        + struct.pack(">QB", delivery_tag, redelivered)
        + bytes([len(b"swarm.tasks")])
        + b"swarm.tasks"
        + bytes([len(routing_key)])
        + routing_key
    )
    frame = struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce"
    with tolerant_frames():
        _, _, deliver = pamqp.frame.unmarshal(frame)
    assert isinstance(deliver, commands.Basic.Deliver)
    assert deliver.routing_key == routing_key.decode("utf-8", "backslashreplace")
    assert deliver.consumer_tag == consumer_tag
    assert deliver.delivery_tag == delivery_tag
    assert deliver.redelivered is redelivered
    assert deliver.exchange == "swarm.tasks"
