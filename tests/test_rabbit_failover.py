"""Several RabbitMQ nodes: the daemon and the client given a cluster's URLs fail over to another
node when theirs dies (`kill -9` of its Erlang VM, tasks in flight), and no task is lost.

On a real three-node cluster started beside the system node (tests/rabbit_cluster.py). Task
queues and the client's reply queue are quorum queues and the outcome store a stream, all
replicated on the three nodes; killing one leaves a majority."""

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aio_pika.abc import AbstractIncomingMessage
from conftest import missing_requirement
from daemon_process import DaemonProcess
from hardening import REPORTED
from rabbit_cluster import RabbitCluster, RabbitNode, rabbitmq_tool

from broker.amqp.outcome_replay import OUTCOMES_QUEUE
from broker.amqp.urls import redact
from broker.producer.client import SwarmClient
from schemas.codec import decode
from schemas.topology import task_queue

TASKS = 2_000
# Replies (scenario A) or confirmed publishes (B) before the kill: the rest are in flight.
KILL_AFTER = 300
# Past it the test fails with what is missing (well inside pytest's own timeout).
REPLY_WAIT_S = 90.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    if rabbitmq_tool("rabbitmq-server") is None or rabbitmq_tool("rabbitmqctl") is None:
        missing_requirement("rabbitmq-server and rabbitmqctl not on PATH: a cluster is needed")
    made = RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster"))
    try:
        started = time.monotonic()
        made.start()
        REPORTED.append(f"rabbit cluster: 3 nodes formed in {time.monotonic() - started:.1f} s")
        yield made
    finally:
        made.remove()


@dataclass
class Replies:
    """Every reply the client's queue delivered, by task id, bodies kept: duplicates show."""

    expected: int
    bodies: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    reached: dict[int, asyncio.Event] = field(default_factory=dict)

    def watch(self, client: SwarmClient) -> None:
        forward = client._session.on_reply

        async def on_reply(message: AbstractIncomingMessage) -> None:
            self.bodies[decode(message.body)["id"]].append(bytes(message.body))
            for count, event in self.reached.items():
                if len(self.bodies) >= count:
                    event.set()
            await forward(message)

        client._session.on_reply = on_reply

    def when(self, count: int) -> asyncio.Event:
        self.reached[count] = asyncio.Event()
        return self.reached[count]

    def figures(self, ids: list[str]) -> tuple[int, int, int]:
        """(answered, lost, duplicates); each duplicate has the first reply's exact body."""
        answered = sum(1 for task_id in ids if self.bodies.get(task_id))
        duplicates = 0
        for task_id in ids:
            first, *again = self.bodies.get(task_id, [b""])
            assert all(body == first for body in again), f"{task_id}: a duplicate differs"
            duplicates += len(again)
        return answered, len(ids) - answered, duplicates


def connection_events(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """What the daemon logged about its connection, to say why an assertion failed."""
    return [entry for entry in daemon.log if "node" in entry or "reconnect" in entry["event"]]


async def every_reply(
    sending: "asyncio.Task[list[Any]]",
    replies: Replies,
    ids: list[str],
    daemon: DaemonProcess,
    cluster: RabbitCluster,
    asked: RabbitNode,
) -> None:
    """Until every task is sent and answered; past REPLY_WAIT_S, fail saying what is missing."""

    async def answered() -> None:
        await asyncio.gather(*await sending)

    try:
        await asyncio.wait_for(answered(), REPLY_WAIT_S)
    except asyncio.TimeoutError:
        missing = [task_id for task_id in ids if not replies.bodies.get(task_id)]
        queues = await asyncio.to_thread(
            cluster.ctl,
            asked,
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
            "leader",
            "online",
        )
        raise AssertionError(
            f"{len(missing)} tasks unanswered (first {missing[:5]}); sending done: "
            f"{sending.done()}; daemon: {connection_events(daemon)}; last daemon lines: "
            f"{daemon.log[-8:]}; queues as {asked.name} sees them:\n{queues}"
        ) from None


def urls(*nodes: RabbitNode) -> str:
    return ",".join(node.url for node in nodes)


async def start_daemon(nodes: str, ray_address: str) -> DaemonProcess:
    daemon = DaemonProcess(nodes, ray_address, cpu_pool_max=1, prefetch=256)
    return await daemon.start()


async def check_replicated(cluster: RabbitCluster, asked: RabbitNode) -> None:
    """The outcome stream and the task queues have a member online on every node."""
    every = sorted(node.name for node in cluster.nodes)
    for queue in (OUTCOMES_QUEUE, task_queue("inference")):
        row = await asyncio.to_thread(cluster.queue_members, asked, queue)
        assert sorted(row["online"]) == every, row  # type: ignore[arg-type]


async def rejoin(cluster: RabbitCluster, node: RabbitNode) -> float:
    started = time.monotonic()
    await asyncio.to_thread(cluster.restart, node)
    running = await asyncio.to_thread(cluster.running_nodes, node)
    assert running == sorted(n.name for n in cluster.nodes), running
    return time.monotonic() - started


async def send_all(client: SwarmClient, prefix: str, on_confirmed: asyncio.Event) -> list[Any]:
    """Publish every task at once (each awaits its own confirm); set `on_confirmed` once
    KILL_AFTER of them are confirmed."""
    confirmed = 0

    async def send(index: int) -> Any:
        nonlocal confirmed
        future = await client.send("inference", "echo", {"i": index}, task_id=f"{prefix}-{index}")
        confirmed += 1
        if confirmed >= KILL_AFTER:
            on_confirmed.set()
        return future

    return await asyncio.gather(*(send(index) for index in range(TASKS)))


async def test_the_daemon_fails_over_when_its_node_is_killed(
    cluster: RabbitCluster, ray_address: str
) -> None:
    one, two, three = cluster.nodes
    daemon = await start_daemon(urls(one, two, three), ray_address)
    # The producer on nodes that survive: its connection is not what this scenario tests.
    async with SwarmClient([two.url, three.url]) as client:
        assert (await client.status())["rabbitmq"]["node"] == redact(one.url)
        await check_replicated(cluster, two)
        replies = Replies(TASKS)
        replies.watch(client)
        in_flight = replies.when(KILL_AFTER)
        ids = [f"a-{index}" for index in range(TASKS)]
        sending = asyncio.create_task(send_all(client, "a", asyncio.Event()))
        await in_flight.wait()
        killed_at = time.monotonic()
        await cluster.kill(one)
        await daemon.logged("reconnected", timeout_s=REPLY_WAIT_S)
        reconnect_s = time.monotonic() - killed_at
        await every_reply(sending, replies, ids, daemon, cluster, two)
        answered, lost, duplicates = replies.figures(ids)
        status = await client.status()
    # Node 2 first, unless its replicas were not running yet (RabbitMQ refuses the outcome
    # stream's consumer there for a moment): then node 3.
    assert status["rabbitmq"]["node"] in (redact(two.url), redact(three.url)), connection_events(
        daemon
    )
    rejoin_s = await rejoin(cluster, one)
    daemon.terminate()
    assert await daemon.wait() == 0
    REPORTED.append(
        f"rabbit failover A (daemon's node killed): sent {TASKS}, answered {answered}, "
        f"lost {lost}, duplicates {duplicates}; daemon reconnected {reconnect_s:.1f} s after "
        f"the kill; killed node rejoined in {rejoin_s:.1f} s"
    )
    assert lost == 0
    # Guarantees, duplicates (2): at most the replies unconfirmed when the connection dropped.
    assert duplicates <= 256


async def test_the_client_republishes_what_was_unconfirmed_when_its_node_died(
    cluster: RabbitCluster, ray_address: str
) -> None:
    one, two, three = cluster.nodes
    daemon = await start_daemon(urls(one, two, three), ray_address)
    async with SwarmClient(urls(one, two, three)) as client:
        assert client.node == redact(one.url)
        replies = Replies(TASKS)
        replies.watch(client)
        reconnected_at: list[float] = []
        opened = client._session.open_on

        async def open_on(url: str) -> None:
            await opened(url)
            reconnected_at.append(time.monotonic())

        client._session.open_on = open_on  # type: ignore[method-assign]
        ids = [f"b-{index}" for index in range(TASKS)]
        # The reply queue's quorum leader is on the node to be killed (declared there): the
        # daemon's replies meet its election (nacks) and are sent again.
        members = await asyncio.to_thread(cluster.queue_members, two, client.reply_queue)
        assert members["leader"] == one.name, members
        confirmed = asyncio.Event()
        sending = asyncio.create_task(send_all(client, "b", confirmed))
        await confirmed.wait()
        killed_at = time.monotonic()
        await cluster.kill(one)  # publishes unconfirmed now must be sent again
        await every_reply(sending, replies, ids, daemon, cluster, two)
        answered, lost, duplicates = replies.figures(ids)
        assert client.node in (redact(two.url), redact(three.url))
        resent = client.publishes_resent
    await daemon.logged("reconnected", timeout_s=REPLY_WAIT_S)
    rejoin_s = await rejoin(cluster, one)
    daemon.terminate()
    assert await daemon.wait() == 0
    client_reconnect_s = reconnected_at[0] - killed_at
    replies_resent = sum(1 for entry in daemon.log if entry["event"] == "reply_taken_on_resend")
    REPORTED.append(
        f"rabbit failover B (client's and daemon's node killed): sent {TASKS}, answered "
        f"{answered}, lost {lost}, duplicates {duplicates}, publishes sent again {resent}, "
        f"replies taken on a re-send {replies_resent}; "
        f"client reconnected {client_reconnect_s:.1f} s after the kill; killed node rejoined "
        f"in {rejoin_s:.1f} s"
    )
    assert resent > 0, "the kill found publishes unconfirmed"
    assert lost == 0
    # Guarantees, duplicates (2), plus the stored reply that a task published again gets
    # when its first publish had reached the queue before the kill.
    assert duplicates <= 256 + resent
