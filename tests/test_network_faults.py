"""Network faults between Swarm and RabbitMQ, injected with a TCP proxy (tests/netproxy.py).

The daemon (or the client) talks to RabbitMQ through the proxy; the test's producer talks to
RabbitMQ directly, so a fault hits only the side under test. Tasks published before, during
and after the fault must all be answered: a task may be answered twice (at least once), so
replies are counted by distinct id. Waiting is on replies, on the daemon's deliveries and on
the proxy's counters, never on fixed sleeps.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from conftest import DaemonFactory, missing_requirement, until, when_delivered
from netproxy import TcpProxy, local_target
from raw import Inbox, RawProducer, task

from broker.producer.client import SwarmClient

# Sleep tasks long enough that some are running when the fault hits, short enough for a
# fast test; inference tasks take 0.05 CPU, so one CPU actor runs up to 20 at once.
TASK_SECONDS = 0.3
BATCH = 30
REPLY_WAIT_S = 90.0


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[TcpProxy]:
    target = local_target(amqp_url)
    if target is None:
        missing_requirement("fault injection needs RabbitMQ on 127.0.0.1")
    async with TcpProxy(*target) as running:
        yield running


@dataclass
class Ledger:
    """What was sent, and what came back, by task id."""

    inbox: Inbox
    sent: list[str] = field(default_factory=list)

    async def send(self, producer: RawProducer, count: int) -> None:
        for _ in range(count):
            body = task("inference", "sleep", {"seconds": TASK_SECONDS})
            self.sent.append(body["id"])
            await producer.publish("inference", body, reply_to=self.inbox.name)

    def answered(self) -> set[str]:
        return {r.payload["id"] for r in self.inbox.messages}

    async def wait_all(self, timeout_s: float = REPLY_WAIT_S) -> None:
        """Until every sent id has a reply; on timeout the report below shows what is lost."""
        wanted = set(self.sent)
        with contextlib.suppress(asyncio.TimeoutError):
            await self.inbox.wait_until(
                lambda messages: wanted <= {r.payload["id"] for r in messages}, timeout_s
            )

    def report(self, fault: str) -> tuple[int, int]:
        replies = len(self.inbox.messages)
        distinct = self.answered()
        lost = len(set(self.sent) - distinct)
        duplicated = replies - len(distinct)
        print(
            f"fault={fault} sent={len(self.sent)} replies={replies} "
            f"distinct={len(distinct)} lost={lost} duplicated={duplicated}"
        )
        return lost, duplicated


async def test_daemon_survives_a_link_cut(
    proxy: TcpProxy, start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str
) -> None:
    await start_daemon(amqp_url=proxy.url_for(amqp_url))
    connections = proxy.accepted
    ledger = Ledger(await producer.inbox())

    # Before: a batch, cut while part of it runs on the actor and part waits.
    await ledger.send(producer, BATCH)
    await ledger.inbox.wait_for(1, REPLY_WAIT_S)
    assert await proxy.cut() >= 1
    # During: the daemon is disconnected until it reconnects through the proxy.
    await ledger.send(producer, BATCH)
    await proxy.wait_accepted(connections + 1, REPLY_WAIT_S)
    # After: the daemon is connected again.
    await ledger.send(producer, BATCH)

    await ledger.wait_all()
    lost, _ = ledger.report("link-cut")
    assert lost == 0
    assert all(r.payload["status"] == "ok" for r in ledger.inbox.messages)


async def test_daemon_survives_rabbitmq_unreachable_for_a_while(
    proxy: TcpProxy, start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str
) -> None:
    """A cut, then every reconnect refused (as if RabbitMQ were down) until the daemon has
    tried a few times; then the link comes back."""
    await start_daemon(amqp_url=proxy.url_for(amqp_url))
    connections = proxy.accepted
    ledger = Ledger(await producer.inbox())

    await ledger.send(producer, BATCH)
    await ledger.inbox.wait_for(1, REPLY_WAIT_S)
    proxy.block()
    try:
        assert await proxy.cut() >= 1
        await ledger.send(producer, BATCH)
        await proxy.wait_refused(3, REPLY_WAIT_S)  # the daemon retried and was refused
    finally:
        proxy.unblock()
    await proxy.wait_accepted(connections + 1, REPLY_WAIT_S)
    await ledger.send(producer, BATCH)

    await ledger.wait_all()
    lost, _ = ledger.report("link-down")
    assert lost == 0
    assert all(r.payload["status"] == "ok" for r in ledger.inbox.messages)


@pytest.mark.parametrize(
    ("fault", "heartbeat_s"),
    [
        # Shorter than any heartbeat timeout: the connection survives, bytes are late.
        ("link-stall", None),
        # Longer than the heartbeat timeout: both ends give the connection up while no byte
        # moves, and the daemon must reconnect once the link flows again.
        ("link-stall-past-heartbeat", 1),
    ],
)
async def test_daemon_survives_a_link_stall(
    proxy: TcpProxy,
    start_daemon: DaemonFactory,
    producer: RawProducer,
    amqp_url: str,
    fault: str,
    heartbeat_s: int | None,
) -> None:
    url = proxy.url_for(amqp_url)
    if heartbeat_s is not None:
        url += f"?heartbeat={heartbeat_s}"
    daemon = await start_daemon(amqp_url=url)
    ingress = daemon.ingress
    assert ingress is not None
    connections = proxy.accepted
    assert proxy.live == 1  # the daemon's one connection
    ledger = Ledger(await producer.inbox())

    # Stalled once the whole batch reached the daemon: its last task cannot have finished, so
    # its reply is due while no byte moves.
    arrived = when_delivered(daemon, BATCH)
    await ledger.send(producer, BATCH)
    await asyncio.wait_for(arrived.wait(), REPLY_WAIT_S)
    proxy.stall()
    try:
        await proxy.wait_held(1, REPLY_WAIT_S)  # a reply, held on its way to RabbitMQ
        during = len(ledger.sent)
        await ledger.send(producer, BATCH)
        await proxy.wait_held(2, REPLY_WAIT_S)  # and the new deliveries, on their way here
        if heartbeat_s is not None:
            # Held until the daemon has given the silent connection up (no event says so).
            await until(lambda: not ingress.consuming, "the daemon drops the stalled link")
        # Nothing sent during the stall can have been answered: the stall bit.
        assert not set(ledger.sent[during:]) & ledger.answered()
    finally:
        proxy.resume()
    await ledger.send(producer, BATCH)

    await ledger.wait_all()
    lost, _ = ledger.report(fault)
    assert lost == 0
    assert all(r.payload["status"] == "ok" for r in ledger.inbox.messages)
    if heartbeat_s is None:
        # Late bytes only: the connection came through the stall.
        assert (ingress.sessions, proxy.accepted) == (1, connections)
    else:
        # RabbitMQ and the daemon gave the silent connection up: it came back on a new one.
        assert ingress.sessions >= 2
        assert proxy.accepted > connections


async def test_client_submits_again_after_a_link_cut(
    proxy: TcpProxy, start_daemon: DaemonFactory, amqp_url: str
) -> None:
    await start_daemon()  # the daemon connects directly; only the client's link is cut
    async with SwarmClient(proxy.url_for(amqp_url)) as client:
        before = await client.submit("inference", "echo", {"n": 1}, wait_s=60)
        assert before.status == "ok"
        assert before.result == {"n": 1}
        connections = proxy.accepted

        assert await proxy.cut() == 1
        after = await client.submit("inference", "echo", {"n": 2}, wait_s=60)
        assert after.status == "ok"
        assert after.result == {"n": 2}
        assert proxy.accepted > connections  # it came back over a new connection


async def test_client_gets_replies_in_flight_across_a_link_cut(
    proxy: TcpProxy, start_daemon: DaemonFactory, amqp_url: str
) -> None:
    """Tasks confirmed before the cut are answered while the client is away; the replies wait
    in its reply queue and reach the futures once it is back."""
    await start_daemon()
    async with SwarmClient(proxy.url_for(amqp_url)) as client:
        pending = [
            await client.send("inference", "sleep", {"seconds": TASK_SECONDS, "n": n})
            for n in range(10)
        ]
        connections = proxy.accepted
        assert await proxy.cut() == 1
        replies = await asyncio.wait_for(asyncio.gather(*pending), REPLY_WAIT_S)
        assert [r.status for r in replies] == ["ok"] * 10
        assert [r.result["n"] for r in replies] == list(range(10))
        await proxy.wait_accepted(connections + 1, REPLY_WAIT_S)


async def test_daemon_recovers_when_rabbitmq_closes_its_publish_channel(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    """A channel-level error leaves the connection up but closes one channel. Here an
    operator deletes the `swarm.dead` exchange; the next dead letter is refused (404) and
    RabbitMQ closes the daemon's publishing channel. The daemon must recover (open a new
    channel, declare its topology again) and go on answering tasks."""
    await start_daemon()
    inbox = await producer.inbox()
    await producer.publish("inference", task(), reply_to=inbox.name)
    await inbox.wait_for(1)

    await producer.channel.exchange_delete("swarm.dead")
    # Its reply and copy are confirmed before the dead letter is refused: the reply arrives.
    await producer.publish(
        "inference", task("inference", "fail", {"message": "x"}), reply_to=inbox.name
    )
    assert (await inbox.wait_for(2))[1].payload["error"]["code"] == "handler_error"

    body = task()
    await producer.publish("inference", body, reply_to=inbox.name)
    # A healthy daemon answers in well under a second.
    await inbox.wait_until(lambda replies: body["id"] in {r.payload["id"] for r in replies}, 20)
