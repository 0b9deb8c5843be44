"""The producers' Python client against the real daemon."""

import asyncio
import time

import pytest
from conftest import DaemonFactory

from broker.amqp.urls import redact
from broker.daemon import Daemon
from broker.producer.client import SubmitError, SwarmClient, SyncSwarmClient


async def test_submit_returns_the_reply(daemon: Daemon, amqp_url: str) -> None:
    async with SwarmClient(amqp_url) as client:
        reply = await client.submit("inference", "echo", {"x": 1}, timeout_s=60)
    assert reply.status == "ok"
    assert reply.result == {"x": 1}
    assert reply.pool == "cpu"


async def test_submit_passes_optional_fields(daemon: Daemon, amqp_url: str) -> None:
    async with SwarmClient(amqp_url) as client:
        expired = await client.submit("training", "echo", 1, deadline=time.time() - 5, timeout_s=60)
        pinned = await client.submit(
            "training", "echo", 2, pool="cpu", priority=9, task_id="client-fixed-id", timeout_s=60
        )
    assert expired.status == "expired"
    assert pinned.id == "client-fixed-id"
    assert pinned.result == 2


async def test_map_keeps_input_order_and_bounds_in_flight(daemon: Daemon, amqp_url: str) -> None:
    async with SwarmClient(amqp_url) as client:
        replies = [
            r
            async for r in client.map(
                "data_processing", "echo", range(300), max_in_flight=16, timeout_s=60
            )
        ]
    assert [r.result for r in replies] == list(range(300))
    assert len({r.id for r in replies}) == 300


async def test_map_window_is_respected(daemon: Daemon, amqp_url: str) -> None:
    """While no reply is consumed, at most max_in_flight tasks are ever published."""
    async with SwarmClient(amqp_url) as client:
        sent = 0
        original = client.send

        async def counting_send(*args: object, **kwargs: object) -> "asyncio.Future[object]":
            nonlocal sent
            sent += 1
            return await original(*args, **kwargs)  # type: ignore[arg-type]

        client.send = counting_send  # type: ignore[method-assign]
        replies = client.map("inference", "echo", range(100), max_in_flight=5)
        first = await replies.__anext__()
        assert first.result == 0
        assert sent <= 5 + 1 + 1  # the window, the one consumed, and one being put
        await replies.aclose()


async def test_unroutable_type_is_a_submit_error(daemon: Daemon, amqp_url: str) -> None:
    async with SwarmClient(amqp_url) as client:
        with pytest.raises(SubmitError, match="unroutable"):
            await client.send("quantum", "echo", 1)


async def test_client_status(start_daemon: DaemonFactory, amqp_url: str) -> None:
    await start_daemon(cpu_pool_min=2, cpu_pool_max=2)
    async with SwarmClient(amqp_url) as client:
        answer = await client.status()
    assert set(answer) == {"pools", "nodes", "queues", "limits", "rabbitmq"}
    masked = redact(amqp_url)
    assert answer["rabbitmq"] == {"node": masked, "nodes": [masked]}
    assert answer["pools"]["cpu"]["actors"] == 2
    assert answer["pools"]["cpu"]["reserved"]["cpus"] == 2
    assert answer["limits"]["max_body_bytes"] == 8 * 1024 * 1024
    assert set(answer["queues"]) >= {
        "swarm.tasks.training",
        "swarm.tasks.inference",
        "swarm.tasks.data_processing",
        "swarm.control",
    }
    node = answer["nodes"][0]
    assert {"node_id", "total", "reserved", "free", "actors", "running"} <= set(node)


async def test_sync_client(daemon: Daemon, amqp_url: str) -> None:
    """A script's blocking use, on its own thread while the daemon runs on the test loop."""

    def script() -> tuple[object, list[object]]:
        with SyncSwarmClient(amqp_url, reply_timeout_s=60) as client:
            single = client.submit("inference", "echo", "sync").result
            many = [r.result for r in client.map("inference", "echo", [1, 2, 3])]
            return single, many

    assert await asyncio.to_thread(script) == ("sync", [1, 2, 3])
