"""Every rejection in the contract: an error reply to `reply_to` and a copy to `swarm.results`,
and a dead letter with the original bytes, properties and the x-swarm-* headers."""

import time
from typing import Any

import msgpack
import pytest
from raw import RawProducer, task

from broker.daemon import Daemon

BAD_BODIES: list[tuple[str, bytes, dict[str, Any], str, bool]] = [
    # (case, body, properties, expected code, id readable)
    ("not msgpack", b"\xc1\xc1\xc1", {}, "malformed", False),
    ("truncated", msgpack.packb({"v": 1, "id": "x"})[:-2], {}, "malformed", False),
    ("not a map", msgpack.packb([1, 2, 3]), {}, "malformed", False),
    (
        "wrong content type",
        msgpack.packb(task(id="ct-1")),
        {"content_type": "application/json"},
        "malformed",
        False,
    ),
    (
        "missing handler",
        msgpack.packb({"v": 1, "id": "inv-1", "type": "inference"}),
        {},
        "invalid",
        True,
    ),
    ("unknown key", msgpack.packb(task(id="inv-2", colour="red")), {}, "invalid", True),
    (
        "unknown nested key",
        msgpack.packb(task(id="inv-3", resources={"tpus": 1})),
        {},
        "invalid",
        True,
    ),
    ("priority out of range", msgpack.packb(task(id="inv-4", priority=10)), {}, "invalid", True),
    ("version 2", msgpack.packb(task(id="inv-5", v=2)), {}, "invalid", True),
    (
        "unknown handler",
        msgpack.packb(task(id="uh-1", handler="rm_rf")),
        {},
        "unknown_handler",
        True,
    ),
    ("type mismatch", msgpack.packb(task("training", id="tm-1")), {}, "type_mismatch", True),
    (
        "unsatisfiable",
        msgpack.packb(task(id="un-1", resources={"cpus": 10_000})),
        {},
        "unsatisfiable",
        True,
    ),
    (
        "unsatisfiable gpu",
        msgpack.packb(task(id="un-2", resources={"gpus": 1})),
        {},
        "unsatisfiable",
        True,
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "properties", "code", "id_readable"),
    BAD_BODIES,
    ids=[c[0] for c in BAD_BODIES],
)
async def test_bad_input_gets_error_reply_and_dead_letter(
    daemon: Daemon,
    producer: RawProducer,
    case: str,
    body: bytes,
    properties: dict[str, Any],
    code: str,
    id_readable: bool,
) -> None:
    inbox = await producer.inbox()
    results = await producer.watch_results()
    dead = await producer.watch_dead()
    correlation_id = await producer.publish(
        "inference",
        body,
        reply_to=inbox.name,
        message_id="mid-" + case.replace(" ", "-"),
        headers={"x-producer": "raw"},
        app_id="tests",
        **properties,
    )

    reply = await inbox.one()
    payload = reply.payload
    assert payload["status"] == "error"
    assert payload["error"]["code"] == code
    assert payload["error"]["message"]
    assert payload["error"]["retryable"] is False
    assert payload["attempts"] == 0
    assert reply.message.correlation_id == correlation_id
    assert reply.headers["x-swarm-status"] == "error"
    if id_readable:
        assert payload["id"] == msgpack.unpackb(body)["id"]
    copy = await results.one()
    assert copy.message.routing_key == "inference.error"

    letter = await dead.one()
    assert letter.body == body
    assert letter.headers["x-swarm-error-code"] == code
    assert letter.headers["x-swarm-error-message"] == payload["error"]["message"]
    assert letter.headers["x-swarm-source-queue"] == "swarm.tasks.inference"
    assert letter.headers["x-swarm-attempts"] == 0
    assert letter.headers["x-producer"] == "raw"
    assert letter.message.app_id == "tests"
    assert letter.message.correlation_id == correlation_id
    assert letter.message.reply_to == inbox.name
    assert letter.message.message_id == "mid-" + case.replace(" ", "-")
    assert letter.message.content_type == properties.get("content_type", "application/msgpack")


async def test_too_large_is_refused_before_decoding(
    start_daemon: Any, producer: RawProducer
) -> None:
    await start_daemon(max_body_bytes=1024)
    inbox = await producer.inbox()
    dead = await producer.watch_dead()
    body = msgpack.packb(task(id="big-1", args="x" * 2000))
    await producer.publish("inference", body, reply_to=inbox.name)
    payload = (await inbox.one()).payload
    assert payload["error"]["code"] == "too_large"
    assert payload["id"] is None  # refused unread
    letter = await dead.one()
    assert letter.body == body
    assert letter.headers["x-swarm-error-code"] == "too_large"


async def test_memory_bomb_is_malformed(daemon: Daemon, producer: RawProducer) -> None:
    inbox = await producer.inbox()
    bomb = b"\x81\xa4args" + b"\x91" * 5000 + b"\xc0"  # {"args": [[[[...]]]]} 5000 deep
    await producer.publish("inference", bomb, reply_to=inbox.name)
    assert (await inbox.one()).payload["error"]["code"] == "malformed"


async def test_expired_deadline_is_answered_never_run_not_dead_lettered(
    daemon: Daemon, producer: RawProducer
) -> None:
    inbox = await producer.inbox()
    dead = await producer.watch_dead()
    expired = task(id="exp-1", handler="fail", deadline=time.time() - 1)
    failing = task(id="fail-after", handler="fail")
    await producer.publish("inference", expired, reply_to=inbox.name)
    await producer.publish("inference", failing, reply_to=inbox.name)
    first, second = await inbox.wait_for(2)
    by_id = {r.payload["id"]: r.payload for r in (first, second)}
    assert by_id["exp-1"]["status"] == "expired"
    assert by_id["exp-1"]["error"]["code"] == "expired"
    assert by_id["exp-1"]["attempts"] == 0
    # Only the failing task is dead-lettered; the expired one is answered, not dead-lettered.
    letter = await dead.one()
    assert letter.headers["x-swarm-error-code"] == "handler_error"
    assert msgpack.unpackb(letter.body)["id"] == "fail-after"


async def test_expiration_is_removed_from_the_dead_letter(
    daemon: Daemon, producer: RawProducer
) -> None:
    inbox = await producer.inbox()
    dead = await producer.watch_dead()
    body = task(id="exp-prop-1", handler="fail")
    await producer.publish(
        "inference", body, reply_to=inbox.name, expiration=600, message_id="exp-prop-mid"
    )
    await inbox.one()
    letter = await dead.one()
    assert letter.message.expiration is None
    assert letter.message.message_id == "exp-prop-mid"  # the other properties stay as sent


async def test_vanished_reply_queue_is_dead_lettered_and_still_copied(
    daemon: Daemon, producer: RawProducer
) -> None:
    results = await producer.watch_results()
    dead = await producer.watch_dead()
    body = task(id="gone-1")
    await producer.publish("inference", body, reply_to="no-such-queue-anywhere")
    copy = await results.one()
    assert copy.payload["status"] == "ok"
    letter = await dead.one()
    assert letter.headers["x-swarm-error-code"] == "reply_undeliverable"
    assert letter.headers["x-swarm-reply-undeliverable"] == "no-such-queue-anywhere"
    assert msgpack.unpackb(letter.body) == body


async def test_message_expired_in_queue_is_dead_lettered_by_rabbitmq(
    producer: RawProducer, daemon: Daemon
) -> None:
    """With the consumer gone, RabbitMQ's own per-message TTL dead-letters to swarm.dead."""
    dead = await producer.watch_dead()
    await daemon.stop()
    body = task(id="ttl-1")
    await producer.publish("inference", body, expiration=0.05)
    letter = await dead.one()
    assert msgpack.unpackb(letter.body)["id"] == "ttl-1"
    assert letter.headers["x-death"][0]["reason"] == "expired"


async def test_daemon_survives_a_flood_of_garbage(daemon: Daemon, producer: RawProducer) -> None:
    inbox = await producer.inbox()
    for n in range(50):
        await producer.publish("inference", bytes([n % 256]) * (n + 1), reply_to=inbox.name)
    await producer.publish("inference", task(id="after-garbage", args=1), reply_to=inbox.name)
    replies = await inbox.wait_for(51)
    statuses = {r.payload["id"]: r.payload["status"] for r in replies}
    assert statuses["after-garbage"] == "ok"
    assert sum(1 for r in replies if r.payload["status"] == "error") == 50
