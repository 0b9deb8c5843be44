"""Messages whose AMQP properties no decoder can read, against the real RabbitMQ and an
in-process daemon: a header timestamp of 0xFFFFFFFFFFFFFFFF, a header key with byte 0xFF, a
content_type with byte 0xFF, a reply_to with byte 0xFF. RabbitMQ routes each of them; before
broker/amqp/frames.py each one killed the daemon's connection, and every reconnect died on the
redelivered message.

Each is sent between good tasks (the bystanders), from a raw AMQP client (tests/rawamqp.py):
every bystander is answered ok, the hostile message is answered `malformed` under its body's id
(when its reply_to can be read) and dead-lettered with its body unchanged, and the daemon goes
on consuming on its first connection."""

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import pytest
from conftest import DaemonFactory
from hardening import Figures, peak_rss_mb
from raw import Inbox, RawProducer, Received, task
from rawamqp import RawAmqp, RawMessage, array, content_header, longstr, properties, table

from broker.amqp.salvage import Salvage, salvage_content_header

CONTENT_TYPE = b"application/msgpack"
BYSTANDERS_EACH_SIDE = 3
PAD_BYTES = 300_000  # over two frames of RabbitMQ's default frame_max (128 KiB)
FINE_ENTRY = (b"x-fine", b"S" + longstr(b"kept"))


@dataclass(frozen=True)
class HostileCase:
    name: str
    content_type: bytes
    headers: list[tuple[bytes, bytes]]
    # The bytes of the undecodable header entry (key and value), to find in the dead letter.
    hostile_entry: bytes | None
    # What the reply's error message must name.
    named: str
    # False: the reply_to itself cannot be decoded, so the message can only be dead-lettered.
    answerable: bool = True


def _entry(key: bytes, value: bytes) -> bytes:
    return bytes([len(key)]) + key + value


CASES = [
    HostileCase(
        "header_timestamp_max",
        CONTENT_TYPE,
        [(b"x-when", b"T" + b"\xff" * 8), FINE_ENTRY],
        _entry(b"x-when", b"T" + b"\xff" * 8),
        "headers['x-when']",
    ),
    HostileCase(
        "header_key_0xff",
        CONTENT_TYPE,
        [(b"x-k\xffey", b"S" + longstr(b"v")), FINE_ENTRY],
        _entry(b"x-k\xffey", b"S" + longstr(b"v")),
        "not UTF-8",
    ),
    HostileCase(
        # pamqp decodes this in time quadratic in its size (a second of the event loop): a
        # table of more than 1024 values is refused before any decoding.
        "header_array_of_120000_values",
        CONTENT_TYPE,
        [(b"x-many", b"A" + longstr(b"V" * 120_000)), FINE_ENTRY],
        _entry(b"x-many", b"A" + longstr(b"V" * 120_000)),
        "more than 1024 values",
    ),
    HostileCase("content_type_0xff", CONTENT_TYPE + b"\xff", [FINE_ENTRY], None, "content_type"),
    HostileCase("reply_to_0xff", CONTENT_TYPE, [FINE_ENTRY], None, "reply_to", answerable=False),
]


def decoded(message: RawMessage) -> Salvage:
    """A raw delivery's properties, decoded as the daemon would (undecodable entries left out)."""
    return salvage_content_header(content_header(len(message.body), message.properties))


def replied(replies: Inbox, correlation_id: str) -> list[dict[str, object]]:
    return [r.payload for r in replies.messages if r.message.correlation_id == correlation_id]


def all_answered(correlation_ids: list[str]) -> Callable[[list[Received]], bool]:
    def done(messages: list[Received]) -> bool:
        seen = {m.message.correlation_id for m in messages}
        return all(c in seen for c in correlation_ids)

    return done


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_undecodable_properties_are_answered_and_dead_lettered(
    case: HostileCase, start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str
) -> None:
    daemon = await start_daemon()
    replies = await producer.inbox()
    async with await RawAmqp.connect(amqp_url) as raw:
        dead = await raw.watch("swarm.dead")

        async def bystander() -> str:
            return await producer.publish("inference", task(), reply_to=replies.name)

        sent = [await bystander() for _ in range(BYSTANDERS_EACH_SIDE)]
        hostile_id = f"hostile-{uuid.uuid4().hex}"
        hostile_corr = uuid.uuid4().hex
        # Larger than a frame: the body must still assemble behind a salvaged header.
        body = msgpack.packb(task(id=hostile_id, args={"pad": "x" * PAD_BYTES}))
        await raw.publish(
            "swarm.tasks",
            "inference",
            properties(
                content_type=case.content_type,
                headers=table(case.headers),
                delivery_mode=2,
                correlation_id=hostile_corr.encode(),
                reply_to=replies.name.encode() + (b"" if case.answerable else b"\xff"),
                message_id=b"message-id-not-used",
            ),
            body,
        )
        sent.append(hostile_corr)
        sent += [await bystander() for _ in range(BYSTANDERS_EACH_SIDE)]

        expect_replies = sent if case.answerable else [c for c in sent if c != hostile_corr]
        await replies.wait_until(all_answered(expect_replies))
        await dead.wait_until(lambda messages: any(m.body == body for m in messages))

    bystander_replies = [replied(replies, c) for c in sent if c != hostile_corr]
    assert all(len(r) == 1 and r[0]["status"] == "ok" for r in bystander_replies), replies
    if case.answerable:
        (answer,) = replied(replies, hostile_corr)
        assert answer["status"] == "error"
        assert answer["id"] == hostile_id
        assert answer["error"]["code"] == "malformed"
        assert "could not be decoded" in answer["error"]["message"]
        assert case.named in answer["error"]["message"]

    (letter,) = dead.messages  # the hostile one, and no bystander
    assert letter.body == body
    letter_headers = decoded(letter)
    assert letter_headers.header.properties.headers["x-swarm-error-code"] == "malformed"
    assert case.named in letter_headers.header.properties.headers["x-swarm-error-message"]
    assert letter_headers.header.properties.headers["x-fine"] == "kept"
    if case.hostile_entry is not None:
        # The undecodable entry travels on unchanged (spliced from the raw table).
        assert letter_headers.raw_headers is not None
        assert case.hostile_entry in letter_headers.raw_headers

    ready = daemon.ingress.consuming and daemon.ingress.sessions == 1
    answered = sum(1 for c in sent if replied(replies, c))
    # Lost: neither answered nor dead-lettered (the unanswerable one is dead-lettered only).
    lost = sum(1 for c in sent if not replied(replies, c) and c != hostile_corr)
    Figures(
        case=f"properties:{case.name}",
        sent=len(sent),
        answered=answered,
        lost=lost,
        duplicated=len(replies.messages) - answered,
        dead_letters=len(dead.messages),
        peak_rss_mb=peak_rss_mb(),
        ready=ready,
    ).check(dead_letters=1)


async def test_a_routing_key_that_is_not_utf8_is_processed(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str
) -> None:
    """With a `CC` header a producer routes a message to a task queue under a routing key that
    is not UTF-8, and RabbitMQ delivers it under that key: the delivery is read with the key
    escaped, and the task, otherwise good, runs like any other."""
    daemon = await start_daemon()
    replies = await producer.inbox()
    async with await RawAmqp.connect(amqp_url) as raw:
        dead = await raw.watch("swarm.dead")

        async def bystander() -> str:
            return await producer.publish("inference", task(), reply_to=replies.name)

        sent = [await bystander() for _ in range(BYSTANDERS_EACH_SIDE)]
        routed_corr = uuid.uuid4().hex
        routed_id = f"routed-{uuid.uuid4().hex}"
        await raw.publish(
            "swarm.tasks",
            b"inference\xff",
            properties(
                content_type=CONTENT_TYPE,
                headers=table([(b"CC", b"A" + array([b"S" + longstr(b"inference")]))]),
                correlation_id=routed_corr.encode(),
                reply_to=replies.name.encode(),
            ),
            msgpack.packb(task(id=routed_id)),
        )
        sent.append(routed_corr)
        sent += [await bystander() for _ in range(BYSTANDERS_EACH_SIDE)]
        await replies.wait_until(all_answered(sent))

    answers = [replied(replies, c) for c in sent]
    assert all(len(a) == 1 and a[0]["status"] == "ok" for a in answers), replies
    (routed,) = replied(replies, routed_corr)
    assert routed["id"] == routed_id
    answered = sum(1 for a in answers if a)
    Figures(
        case="properties:routing_key_0xff_via_cc",
        sent=len(sent),
        answered=answered,
        lost=len(sent) - answered,
        duplicated=len(replies.messages) - answered,
        dead_letters=len(dead.messages),
        peak_rss_mb=peak_rss_mb(),
        ready=daemon.ingress.consuming and daemon.ingress.sessions == 1,
    ).check(dead_letters=0)


async def test_a_control_request_with_undecodable_headers_is_refused_not_acted_on(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str
) -> None:
    """A cancel whose header table cannot be decoded is answered `invalid` and not carried
    out: a request read in part is never acted on. The connection goes on: the next status
    request is answered."""
    daemon = await start_daemon()
    replies = await producer.inbox()
    async with await RawAmqp.connect(amqp_url) as raw:
        request = msgpack.packb({"v": 1, "op": "cancel", "id": "not-to-be-cancelled"})
        await raw.publish(
            "",
            "swarm.control",
            properties(
                content_type=CONTENT_TYPE,
                headers=table([(b"x-when", b"T" + b"\xff" * 8)]),
                correlation_id=b"hostile-cancel",
                reply_to=replies.name.encode(),
            ),
            request,
        )
        await raw.publish(
            "",
            "swarm.control",
            properties(
                content_type=CONTENT_TYPE,
                correlation_id=b"status",
                reply_to=replies.name.encode(),
            ),
            msgpack.packb({"v": 1, "op": "status"}),
        )
        await replies.wait_until(all_answered(["hostile-cancel", "status"]))
    (refused,) = replied(replies, "hostile-cancel")
    assert refused["status"] == "error"
    assert refused["error"]["code"] == "invalid"
    assert "headers['x-when']" in refused["error"]["message"]
    (status,) = replied(replies, "status")
    assert status["status"] == "ok"
    assert not daemon.store.cancel_pending("not-to-be-cancelled")
    Figures(
        case="properties:control_header_timestamp_max",
        sent=2,
        answered=len(replies.messages),
        lost=2 - len(replies.messages),
        ready=daemon.ingress.consuming and daemon.ingress.sessions == 1,
    ).check()
