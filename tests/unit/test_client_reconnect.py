"""The client session's supervisor (broker/producer/session.py): any failure of a session
(its connection dropped, RabbitMQ closing its channel, a channel error while declaring on the
way back) leads to a new session with backoff; only close() ends it. On fake connections: no
RabbitMQ."""

import asyncio
from collections.abc import Callable
from typing import Any

import aiormq
import pytest

from broker.producer import session as session_module
from broker.producer.client import SwarmClient


class Callbacks(list[Callable[..., Any]]):
    def add(self, callback: Callable[..., Any]) -> None:
        self.append(callback)

    def fire(self) -> None:
        for callback in list(self):
            callback(None, None)


class FakeQueue:
    name = "swarm.reply.test"

    async def consume(self, callback: Any, no_ack: bool = False) -> str:
        return "ctag"


class FakeChannel:
    def __init__(self) -> None:
        self.close_callbacks = Callbacks()

    async def declare_queue(self, name: str, **_: Any) -> FakeQueue:
        return FakeQueue()


class FakeConnection:
    def __init__(self) -> None:
        self.close_callbacks = Callbacks()
        self.channels: list[FakeChannel] = []
        self.is_closed = False

    async def channel(self, publisher_confirms: bool = False) -> FakeChannel:
        channel = FakeChannel()
        self.channels.append(channel)
        return channel

    async def close(self) -> None:
        if not self.is_closed:
            self.is_closed = True
            self.close_callbacks.fire()


class FakeTopology:
    tasks = object()


class Broker:
    """Hands out fake connections; `declare_failures` makes that many declares raise what
    RabbitMQ answers a bad declare with: a channel error, not an AmqpUnavailable."""

    def __init__(self) -> None:
        self.connections: list[FakeConnection] = []
        self.declare_failures = 0
        self.opened = asyncio.Event()
        self.urls: list[str] = []  # the URL of each connection opened

    async def connect(self, url: str, *, name: str = "") -> FakeConnection:
        self.urls.append(url)
        connection = FakeConnection()
        self.connections.append(connection)
        return connection

    async def declare(self, channel: FakeChannel) -> FakeTopology:
        if self.declare_failures:
            self.declare_failures -= 1
            raise aiormq.exceptions.ChannelPreconditionFailed("inequivalent arg")
        self.opened.set()
        return FakeTopology()


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Broker:
    fake = Broker()
    monkeypatch.setattr(session_module, "connect", fake.connect)
    monkeypatch.setattr(session_module, "declare", fake.declare)
    monkeypatch.setattr(session_module, "RECONNECT_FIRST_S", 0.001)
    monkeypatch.setattr(session_module, "RECONNECT_MAX_S", 0.005)
    return fake


async def until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Let the loop run until `condition()` holds: the supervisor has no event to await."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


async def reconnected(broker: Broker, swarm: SwarmClient, connections: int) -> None:
    await until(lambda: len(broker.connections) >= connections and swarm._session.ready.is_set())


async def test_a_channel_error_on_the_way_back_does_not_end_reconnection(broker: Broker) -> None:
    swarm = SwarmClient("amqp://fake/")
    await swarm.connect()
    broker.declare_failures = 2
    await broker.connections[0].close()  # the connection drops
    await reconnected(broker, swarm, 4)
    assert swarm._session._supervisor is not None and not swarm._session._supervisor.done()
    # The two sessions that failed half-way were closed, not left open.
    assert [c.is_closed for c in broker.connections] == [True, True, True, False]
    await swarm.close()


async def test_a_channel_closed_by_rabbitmq_leads_to_a_new_session(broker: Broker) -> None:
    swarm = SwarmClient("amqp://fake/")
    await swarm.connect()
    first = broker.connections[0]
    first.channels[0].close_callbacks.fire()  # RabbitMQ closed the channel; connection lives
    await reconnected(broker, swarm, 2)
    assert first.is_closed, "the old connection was left open"
    await swarm.close()


async def test_close_stops_the_supervisor_while_it_backs_off(broker: Broker) -> None:
    swarm = SwarmClient("amqp://fake/")
    await swarm.connect()
    broker.declare_failures = 10**6
    await broker.connections[0].close()
    await until(lambda: len(broker.connections) >= 3)
    supervisor = swarm._session._supervisor
    assert supervisor is not None
    await swarm.close()
    with pytest.raises(asyncio.CancelledError):
        await supervisor
    settled = len(broker.connections)
    await asyncio.sleep(0.02)
    assert len(broker.connections) == settled


async def test_a_lost_connection_moves_to_the_next_node(broker: Broker) -> None:
    one, two = "amqp://u:secret@one/", "amqp://u:secret@two/"
    swarm = SwarmClient([one, two])
    await swarm.connect()
    assert swarm.node == "amqp://u:***@one/"
    await broker.connections[0].close()
    await reconnected(broker, swarm, 2)
    assert broker.urls == [one, two]
    assert swarm.node == "amqp://u:***@two/"
    await swarm.close()


async def test_one_url_declares_the_reply_queue_as_always_several_a_quorum_queue(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    declared: list[dict[str, Any]] = []

    async def declare_queue(self: FakeChannel, name: str, **kwargs: Any) -> FakeQueue:
        declared.append(kwargs)
        return FakeQueue()

    monkeypatch.setattr(FakeChannel, "declare_queue", declare_queue)
    for urls in ("amqp://one/", "amqp://one/,amqp://two/"):
        swarm = SwarmClient(urls)
        await swarm.connect()
        await swarm.close()
    single, several = declared
    assert single["durable"] is False and "x-queue-type" not in single["arguments"]
    assert several["durable"] is True and several["arguments"]["x-queue-type"] == "quorum"
