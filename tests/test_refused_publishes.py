"""Replies and dead letters RabbitMQ refuses: too large for a frame, headers pamqp cannot
write back, a full reply queue, a full swarm.dead. Real RabbitMQ, real Ray, in-process daemon.
"""

import asyncio
import struct
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import msgpack
import pytest
from conftest import DaemonFactory
from hardening import Figures, peak_rss_mb
from rabbit import RabbitServer
from raw import Inbox, RawProducer, task

from broker.daemon import Daemon
from broker.producer.client import SwarmClient
from schemas.topology import (
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    REPLY_UNDELIVERABLE,
    TRACEBACK_HEADER,
    UNDELIVERED_REPLY_HEADER,
)

DIAGNOSTICS = ["workers.diagnostics"]
TRUNCATED = "x-swarm-headers-truncated"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
FRAME_MAX = 131072


class RawHeaders(aiormq.spec.Basic.Properties):
    """Properties whose header table goes out as bytes the test wrote itself: how a producer
    in another language sends what pamqp cannot (non-UTF-8 longstr, doubles, long keys)."""

    def __init__(self, table: bytes, **properties: Any) -> None:
        super().__init__(headers={"": ""}, **properties)
        self.table = table

    def encode_property(self, name: str, value: Any) -> bytes:
        if name == "headers":
            return struct.pack(">I", len(self.table)) + self.table
        return super().encode_property(name, value)


def entry(key: bytes, tag: bytes, value: bytes) -> bytes:
    return bytes((len(key),)) + key + tag + value


def longstr(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


async def publish_raw(
    producer: RawProducer, task_type: str, body: dict[str, Any], table: bytes, **props: Any
) -> None:
    channel = await producer.channel.get_underlay_channel()
    await channel.basic_publish(
        msgpack.packb(body, use_bin_type=True),
        exchange="swarm.tasks",
        routing_key=task_type,
        properties=RawHeaders(table, content_type="application/msgpack", delivery_mode=2, **props),
    )


def vhost_of(amqp_url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path[1:])


def queue_totals(rabbit: RabbitServer, vhost: str) -> dict[str, int]:
    """Messages per queue, ready plus unacknowledged, as RabbitMQ counts them."""
    out = rabbit.rabbitmqctl(
        "list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "messages"
    )
    totals = {}
    for line in out.splitlines():
        name, _, count = line.rpartition("\t")
        if name:
            totals[name] = int(count)
    return totals


async def eventually(check: Callable[[], bool], timeout_s: float = 90.0) -> None:
    """For what has no event to await (RabbitMQ's counts, seen through rabbitmqctl)."""

    async def until() -> None:
        # In a thread: rabbitmqctl takes a second, and the daemon shares this event loop.
        while not await asyncio.to_thread(check):  # noqa: ASYNC110 - state in RabbitMQ
            await asyncio.sleep(0.2)

    await asyncio.wait_for(until(), timeout_s)


def oversized_reply_headers(reply_to: str) -> dict[str, Any]:
    """Trace headers with which a task (128-character id, no correlation_id) fits its frame
    with 10 bytes to spare, and its reply (the status header, the id as correlation_id)
    does not."""
    headers: dict[str, Any] = {"traceparent": TRACEPARENT, "tracestate": ""}
    sent_properties = aio_pika.Message(
        b"",
        headers=headers,
        content_type="application/msgpack",
        delivery_mode=2,
        reply_to=reply_to,
        message_id=uuid.uuid4().hex,  # the size of the one aiormq fills in
    ).properties
    room = FRAME_MAX - 20 - len(sent_properties.marshal()) - 10
    headers["tracestate"] = "vendor=" + "s" * (room - len("vendor="))
    return headers


def scrape(daemon: Daemon) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics") as page:
        return str(page.read().decode())


def ready(daemon: Daemon) -> bool:
    return daemon.ingress is not None and daemon.ingress.consuming


# -- item 2: a reply one byte too large --------------------------------------------------------
async def test_a_reply_too_large_for_a_frame_drops_tracestate_and_wedges_nothing(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    daemon = await start_daemon()
    replies = await producer.inbox()
    big_id = "b" * 128
    headers = oversized_reply_headers(replies.name)
    await producer.publish(
        "inference",
        task(id=big_id, args="big"),
        reply_to=replies.name,
        correlation_id=None,
        headers=headers,
    )
    bystanders = [task(args=i) for i in range(30)]
    for body in bystanders:
        await producer.publish("inference", body, reply_to=replies.name)
    await replies.wait_for(31)
    by_id = Counter(r.payload["id"] for r in replies.messages)
    big = next(r for r in replies.messages if r.payload["id"] == big_id)
    assert big.payload["status"] == "ok"
    assert big.message.correlation_id == big_id
    assert big.headers["x-swarm-status"] == "ok"
    assert big.headers[TRUNCATED] == "tracestate"
    assert "tracestate" not in big.headers and big.headers["traceparent"].startswith("00-0af7")
    assert all(by_id[body["id"]] == 1 for body in bystanders)
    assert daemon.ingress is not None and daemon.ingress.sessions == 1
    assert daemon.ingress.publish_stats.headers_truncated == 1
    Figures(
        case="reply-over-frame-max",
        sent=31,
        answered=len(by_id),
        lost=31 - len(by_id),
        duplicated=sum(by_id.values()) - len(by_id),
        peak_rss_mb=peak_rss_mb(),
        ready=ready(daemon),
    ).check()


# -- item 3: dead letters carry the headers pamqp cannot write ----------------------------------
HOSTILE_TABLES: dict[str, tuple[bytes, dict[str, Any]]] = {
    "non-utf8-longstr": (
        entry(b"blob", b"S", longstr(b"\xff\xfe\x00 not utf-8 \xc3")) + entry(b"n", b"b", b"\x07"),
        {"blob": b"\xff\xfe\x00 not utf-8 \xc3", "n": 7},
    ),
    "double-1e300": (
        entry(b"huge", b"d", struct.pack(">d", 1e300))
        + entry(b"third", b"d", struct.pack(">d", 1 / 3)),
        {"huge": 1e300, "third": 1 / 3},
    ),
    "key-200-bytes": (
        entry(b"k" * 200, b"S", longstr(b"long key")),
        {"k" * 200: "long key"},
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TABLES))
async def test_a_dead_letter_carries_headers_pamqp_cannot_encode(
    start_daemon: DaemonFactory, producer: RawProducer, case: str
) -> None:
    daemon = await start_daemon()
    dead = await producer.watch_dead()
    replies = await producer.inbox()
    table, expected = HOSTILE_TABLES[case]
    body = task(handler="no_such_handler")
    await publish_raw(producer, "inference", body, table, reply_to=replies.name)
    reply = await replies.one()
    letter = await dead.one()
    assert reply.payload["status"] == "error"
    assert letter.headers[ERROR_CODE_HEADER] == "unknown_handler"
    for key, value in expected.items():
        # The same type too: the entry spliced byte for byte (a non-UTF-8 longstr stays 'S',
        # decoded as bytes; written from the decoded table it would be a byte array).
        assert letter.headers[key] == value and type(letter.headers[key]) is type(value), key
    assert TRUNCATED not in letter.headers
    Figures(
        case=f"dead-letter-{case}",
        sent=1,
        answered=len(replies.messages),
        lost=1 - len(dead.messages),
        dead_letters=len(dead.messages),
        peak_rss_mb=peak_rss_mb(),
        ready=ready(daemon),
    ).check(dead_letters=1)


async def test_a_task_id_over_255_bytes_is_answered_and_dead_lettered(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    """128 characters of two bytes each: the id is valid, but not as an AMQP short string,
    which the reply's correlation_id and the dead letter's message_id default to."""
    daemon = await start_daemon()
    dead = await producer.watch_dead()
    replies = await producer.inbox()
    long_id = "é" * 128
    body = task(handler="no_such_handler", id=long_id)
    await producer.publish("inference", body, reply_to=replies.name, correlation_id=None)
    reply = await replies.one()
    letter = await dead.one()
    assert reply.payload["id"] == long_id and letter.payload["id"] == long_id
    assert reply.message.correlation_id == "é" * 127  # 254 bytes: cut on a character
    assert reply.headers[TRUNCATED] == "correlation_id"
    assert daemon.ingress is not None and daemon.ingress.sessions == 1
    Figures(
        case="task-id-over-shortstr",
        sent=1,
        answered=len(replies.messages),
        lost=1 - len(replies.messages),
        dead_letters=len(dead.messages),
        peak_rss_mb=peak_rss_mb(),
        ready=ready(daemon),
    ).check(dead_letters=1)


async def test_a_dead_letter_too_large_for_a_frame_is_cut_by_the_rule(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    """127 KB of headers and a long error message: the handler's traceback goes first (no
    room for its last 256 bytes), then the message is shortened, then the largest original
    headers dropped, each named in x-swarm-headers-truncated."""
    daemon = await start_daemon()
    dead = await producer.watch_dead()
    replies = await producer.inbox()
    # 130 entries of exactly 1,000 bytes: the task fits its frame, its dead letter does not.
    headers = {f"h{i:03d}": f"{i:03d}" * 330 for i in range(130)}
    message = "why it failed " * 8000
    body = task(handler="fail", args={"message": message})
    await producer.publish("inference", body, reply_to=replies.name, headers=headers)
    reply = await replies.one()
    letter = await dead.one()
    assert reply.payload["error"]["code"] == "handler_error"
    truncated = letter.headers[TRUNCATED].split(",")
    assert truncated[:2] == [TRACEBACK_HEADER, ERROR_MESSAGE_HEADER]
    assert TRACEBACK_HEADER not in letter.headers
    truncated = truncated[1:]
    shortened = letter.headers[ERROR_MESSAGE_HEADER]
    assert 256 <= len(shortened.encode()) < 4096
    assert reply.payload["error"]["message"].startswith(shortened)
    for key, value in headers.items():
        assert letter.headers.get(key) == value or key in truncated, key
    dropped = [key for key in headers if key not in letter.headers]
    assert 1 <= len(dropped) <= 3 and truncated[1:] == dropped  # only what had to go went
    assert daemon.ingress is not None and daemon.ingress.sessions == 1
    Figures(
        case="dead-letter-over-frame-max",
        sent=1,
        answered=len(replies.messages),
        lost=1 - len(dead.messages),
        dead_letters=len(dead.messages),
        peak_rss_mb=peak_rss_mb(),
        ready=ready(daemon),
    ).check(dead_letters=1)


# -- item 4: a reply queue that refuses ----------------------------------------------------------
async def test_a_refused_reply_is_dead_lettered_and_the_task_runs_once(
    start_daemon: DaemonFactory,
    producer: RawProducer,
    rabbit: RabbitServer,
    amqp_url: str,
    tmp_path: Path,
) -> None:
    # Each refused reply is sent again once (0.2 s after the refusal) before it is given up.
    daemon = await start_daemon(handler_modules=DIAGNOSTICS, refused_reply_retry_s=0.5)
    journal = tmp_path / "runs"
    reply_queue = await producer.channel.declare_queue(
        f"replies-{uuid.uuid4().hex[:8]}",
        arguments={"x-max-length": 5, "x-overflow": "reject-publish"},
    )
    results = await producer.watch_results()
    dead = await producer.watch_dead()
    ids = [f"refused-{i:02d}" for i in range(30)]
    for task_id in ids:
        body = task(
            "data_processing", "journal", {"path": str(journal), "entry": task_id}, id=task_id
        )
        await producer.publish("data_processing", body, reply_to=reply_queue.name)
    await results.wait_for(30)
    await dead.wait_for(25)
    vhost = vhost_of(amqp_url)
    await eventually(lambda: queue_totals(rabbit, vhost).get("swarm.tasks.data_processing") == 0)
    runs = Counter(journal.read_text().split())
    assert runs == Counter({task_id: 1 for task_id in ids})
    assert queue_totals(rabbit, vhost)[reply_queue.name] == 5
    for letter in dead.messages:
        assert letter.headers[ERROR_CODE_HEADER] == REPLY_UNDELIVERABLE
        assert letter.headers[UNDELIVERED_REPLY_HEADER] == reply_queue.name
        assert "refused" in letter.headers[ERROR_MESSAGE_HEADER]
    dead_ids = {letter.payload["id"] for letter in dead.messages}
    answered = Counter(r.payload["id"] for r in results.messages)
    assert len(dead_ids) == 25 and set(answered) == set(ids)
    assert daemon.ingress is not None and daemon.ingress.publish_stats.replies_refused == 25
    assert daemon.ingress.publish_stats.replies_resent == 25
    Figures(
        case="reply-queue-refuses",
        sent=30,
        answered=len(answered),
        lost=30 - len(answered),
        duplicated=sum(answered.values()) - len(answered),
        dead_letters=len(dead.messages),
        peak_rss_mb=peak_rss_mb(),
        ready=ready(daemon),
    ).check(dead_letters=25)


async def test_a_refused_reply_is_sent_again_until_its_queue_takes_it(
    start_daemon: DaemonFactory,
    producer: RawProducer,
    rabbit: RabbitServer,
    amqp_url: str,
) -> None:
    """How a quorum reply queue electing a leader looks to the daemon (a nack for a while),
    made with a full queue that makes room: every reply arrives once, nothing dead-lettered."""
    daemon = await start_daemon(refused_reply_retry_s=120.0)
    assert daemon.ingress is not None
    stats = daemon.ingress.publish_stats
    reply_queue = await producer.channel.declare_queue(
        f"replies-{uuid.uuid4().hex[:8]}",
        arguments={"x-max-length": 2, "x-overflow": "reject-publish"},
    )
    ids = [f"resent-{i}" for i in range(6)]
    for task_id in ids:
        body = task("data_processing", "echo", {"i": task_id}, id=task_id)
        await producer.publish("data_processing", body, reply_to=reply_queue.name)
    # Four replies refused (the queue holds two), each already sent again at least once.
    await eventually(lambda: stats.replies_resent >= 4)
    received: list[str] = []
    all_in = asyncio.Event()

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        received.append(msgpack.unpackb(message.body)["id"])
        await message.ack()
        if len(received) == len(ids):
            all_in.set()

    await reply_queue.consume(take)
    await asyncio.wait_for(all_in.wait(), 60)
    vhost = vhost_of(amqp_url)
    await eventually(lambda: queue_totals(rabbit, vhost).get("swarm.tasks.data_processing") == 0)
    assert sorted(received) == sorted(ids)  # each once
    assert stats.replies_refused == 0
    assert queue_totals(rabbit, vhost).get("swarm.dead") == 0


async def test_the_client_sends_a_refused_task_again_until_its_queue_takes_it(
    rabbit: RabbitServer, amqp_url: str
) -> None:
    """A task queue that nacks (full with reject-publish here; a quorum queue electing a
    leader on a cluster): the client sends again with backoff instead of failing the send."""
    vhost = vhost_of(amqp_url)
    queue = "swarm.tasks.training"
    async with SwarmClient(amqp_url) as client:  # declares the topology; no daemon consumes
        rabbit.rabbitmqctl(
            "set_policy",
            "-p",
            vhost,
            "--apply-to",
            "queues",
            "tasks-cap",
            r"^swarm\.tasks\.training$",
            '{"max-length": 1, "overflow": "reject-publish"}',
        )
        await eventually(
            lambda: (
                "tasks-cap"
                in rabbit.rabbitmqctl(
                    "list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "policy"
                )
            )
        )
        # The policy reaches the quorum queue's state machine a moment after list_queues
        # shows it: send one task at a time until one is refused (each after the first is).
        sends: list[asyncio.Task[Any]] = []
        while client.publishes_resent == 0 and len(sends) < 1000:
            send = client.send("training", "echo", len(sends), task_id=f"capped-{len(sends)}")
            sends.append(asyncio.create_task(send))
            # Polled: the client has no event for a nack it is handling itself.
            while not sends[-1].done() and client.publishes_resent == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert client.publishes_resent >= 1, "no publish was refused"
        # RabbitMQ keeps refusing on a channel it refused on, limit lifted or not: the client
        # goes on on a fresh one.
        rabbit.rabbitmqctl("clear_policy", "-p", vhost, "tasks-cap")
        await asyncio.wait_for(asyncio.gather(*sends), 30)  # none raised SubmitError
        # Each once: a nacked publish is not queued. (The declare's count is the queue's
        # own; list_queues counts a quorum queue's messages with a delay.)
        assert client._session.channel is not None
        declared = await client._session.channel.declare_queue(queue, passive=True)
    assert declared.declaration_result.message_count == len(sends)


# -- item 5: swarm.dead refuses ----------------------------------------------------------------
async def test_dead_letters_swarm_dead_refuses_are_held_until_it_takes_them(
    start_daemon: DaemonFactory,
    producer: RawProducer,
    rabbit: RabbitServer,
    amqp_url: str,
    tmp_path: Path,
) -> None:
    vhost = vhost_of(amqp_url)
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    assert daemon.ingress is not None
    stats = daemon.ingress.publish_stats
    rabbit.rabbitmqctl(
        "set_policy",
        "-p",
        vhost,
        "--apply-to",
        "queues",
        "dead-cap",
        r"^swarm\.dead$",
        '{"max-length": 3, "overflow": "reject-publish"}',
    )
    replies = await producer.inbox()
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    ids = [f"held-{i:02d}" for i in range(30)]
    for task_id in ids:
        args = {"path": str(runs_dir / task_id), "failures": 100}
        body = task("data_processing", "flaky", args, id=task_id, max_retries=0)
        await producer.publish("data_processing", body, reply_to=replies.name)
    await replies.wait_for(30)
    # A quorum queue applies max-length as the messages reach it: a few past 3 may get in.
    await eventually(
        lambda: (
            stats.dead_letters_waiting > 0
            and stats.dead_letters_waiting + queue_totals(rabbit, vhost)["swarm.dead"] == 30
        )
    )
    held = queue_totals(rabbit, vhost)
    waiting = stats.dead_letters_waiting
    assert 3 <= held["swarm.dead"] < 10
    # Held, unacknowledged, not dropped: the task queue still counts them.
    assert held["swarm.tasks.data_processing"] == waiting
    assert stats.dead_letters_refused >= waiting
    metrics = await asyncio.to_thread(scrape, daemon)
    assert f"swarm_dead_letters_waiting {float(waiting)}" in metrics
    assert "swarm_dead_letters_refused_total" in metrics

    # Lifting the limit while swarm.dead is still full: RabbitMQ does not tell the channels
    # it refused that it accepts again (the daemon retries on new channels).
    rabbit.rabbitmqctl("clear_policy", "-p", vhost, "dead-cap")
    swarm_dead = await producer.channel.get_queue("swarm.dead", ensure=False)
    dead = await Inbox(swarm_dead).start()
    await dead.wait_for(30, timeout_s=120)
    await eventually(lambda: queue_totals(rabbit, vhost).get("swarm.tasks.data_processing") == 0)
    assert stats.dead_letters_waiting == 0
    # A later failure is dead-lettered at once: no channel of the daemon is left refusing.
    refused = stats.dead_letters_refused
    args = {"path": str(runs_dir / "held-later"), "failures": 100}
    later = task("data_processing", "flaky", args, id="held-later", max_retries=0)
    await producer.publish("data_processing", later, reply_to=replies.name)
    await dead.wait_for(31)
    assert stats.dead_letters_refused == refused
    ids.append(later["id"])
    dead_ids = Counter(letter.payload["id"] for letter in dead.messages)
    assert dead_ids == Counter({task_id: 1 for task_id in ids})
    assert all(len((runs_dir / task_id).read_text().splitlines()) == 1 for task_id in ids)
    answered = Counter(r.payload["id"] for r in replies.messages)
    assert daemon.ingress.sessions == 1
    Figures(
        case="swarm-dead-refuses",
        sent=31,
        answered=len(answered),
        lost=31 - len(dead_ids),
        duplicated=sum(answered.values()) - len(answered),
        dead_letters=len(dead.messages),
        peak_rss_mb=peak_rss_mb(),
        ready=ready(daemon),
    ).check(dead_letters=31)


# -- the last line of defence ------------------------------------------------------------------
async def test_an_outcome_that_costs_three_connections_is_sent_stripped(
    start_daemon: DaemonFactory, producer: RawProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the size rule switched off, the reply's header frame is over frame_max and each
    publish of it closes the connection: after three, it goes stripped (without its trace
    headers) and arrives once; nothing is published as it was a fourth time."""
    monkeypatch.setattr("broker.amqp.publisher.properties_budget", lambda frame_max: 2**32)
    daemon = await start_daemon()
    assert daemon.ingress is not None
    replies = await producer.inbox()
    headers = oversized_reply_headers(replies.name)
    body = task(args="poison", id="p" * 128)
    await producer.publish(
        "inference", body, reply_to=replies.name, correlation_id=None, headers=headers
    )
    reply = await replies.one()
    assert reply.payload["id"] == body["id"] and reply.headers["x-swarm-status"] == "ok"
    assert "traceparent" not in reply.headers and "tracestate" not in reply.headers
    assert daemon.ingress.publish_stats.stripped == 1
    # A later task is answered on the fourth session, and no second reply came meanwhile.
    after = task(args="after")
    await producer.publish("inference", after, reply_to=replies.name)
    await replies.wait_until(lambda messages: any(m.payload["id"] == after["id"] for m in messages))
    assert daemon.ingress.sessions == 4
    answered = Counter(r.payload["id"] for r in replies.messages)
    Figures(
        case="three-connections-then-stripped",
        sent=2,
        answered=len(answered),
        lost=2 - len(answered),
        duplicated=sum(answered.values()) - len(answered),
        peak_rss_mb=peak_rss_mb(),
        ready=ready(daemon),
    ).check()
