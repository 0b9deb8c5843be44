"""The producers' Python client against the real daemon."""

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import aio_pika
import aiormq
import pytest
from conftest import DaemonFactory, until_journaled

from broker.amqp.urls import redact
from broker.daemon import Daemon
from broker.producer.client import ReplyTimeout, SubmitError, SwarmClient, SyncSwarmClient

DIAGNOSTICS = ["workers.diagnostics"]


async def test_submit_returns_the_reply(daemon: Daemon, amqp_url: str) -> None:
    async with SwarmClient(amqp_url) as client:
        reply = await client.submit("inference", "echo", {"x": 1}, wait_s=60)
    assert reply.status == "ok"
    assert reply.result == {"x": 1}
    assert reply.pool == "cpu"


async def test_submit_passes_optional_fields(daemon: Daemon, amqp_url: str) -> None:
    async with SwarmClient(amqp_url) as client:
        expired = await client.submit("training", "echo", 1, deadline=time.time() - 5, wait_s=60)
        pinned = await client.submit(
            "training", "echo", 2, pool="cpu", priority=9, task_id="client-fixed-id", wait_s=60
        )
    assert expired.status == "expired"
    assert pinned.id == "client-fixed-id"
    assert pinned.result == 2


async def test_map_keeps_input_order_and_bounds_in_flight(daemon: Daemon, amqp_url: str) -> None:
    async with SwarmClient(amqp_url) as client:
        replies = [
            r
            async for r in client.map(
                "data_processing", "echo", range(300), max_in_flight=16, wait_s=60
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


async def test_the_wait_and_the_run_limit_are_two_names(daemon: Daemon, amqp_url: str) -> None:
    """`wait_s` is the client's wait, `run_timeout_s` the task's run limit (wire `timeout_s`)."""
    async with SwarmClient(amqp_url) as client:
        limited = await client.submit(
            "training", "sleep", {"seconds": 60}, wait_s=60, run_timeout_s=0.5
        )
        assert limited.status == "error"
        assert limited.error is not None and limited.error.code == "timeout"
        with pytest.raises(ReplyTimeout) as waited:
            await client.submit(
                "training", "sleep", {"seconds": 3}, task_id="short-wait", wait_s=0.2
            )
        assert waited.value.task_id == "short-wait"
        assert waited.value.queue == "swarm.tasks.training"
        assert waited.value.consumers == 1  # the daemon reads it: just not in time
        assert str(waited.value) == (
            "no reply for task short-wait within 0.2 s (swarm.tasks.training has 1 consumer)"
        )


async def test_timeout_s_still_means_the_wait_with_a_deprecation_warning(
    daemon: Daemon, amqp_url: str
) -> None:
    async with SwarmClient(amqp_url) as client:
        deprecated = pytest.warns(DeprecationWarning, match=r"submit\(timeout_s=...\) is deprec")
        with deprecated, pytest.raises(ReplyTimeout):
            await client.submit("training", "sleep", {"seconds": 3}, timeout_s=0.2)
        with pytest.warns(DeprecationWarning, match=r"map\(timeout_s=...\)"):
            replies = [r async for r in client.map("inference", "echo", [1, 2], timeout_s=60)]
        assert [r.result for r in replies] == [1, 2]
        with pytest.warns(DeprecationWarning, match=r"status\(timeout_s=...\)"):
            assert "pools" in await client.status(timeout_s=30)


async def _queue_exists(amqp_url: str, name: str) -> bool:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True


async def test_close_deletes_the_reply_queue_unless_replies_are_owed(
    start_daemon: DaemonFactory, amqp_url: str, tmp_path: Path
) -> None:
    await start_daemon(handler_modules=DIAGNOSTICS)
    async with SwarmClient(amqp_url) as answered:
        assert (await answered.submit("inference", "echo", 1, wait_s=60)).result == 1
        assert await answered.status(wait_s=30)
        assert answered.replies_owed == 0
    assert not await _queue_exists(amqp_url, answered.reply_queue)

    # A reply still owed: the queue stays for it (RabbitMQ expires it once unused).
    gate, journal = tmp_path / "gate", tmp_path / "runs"
    async with SwarmClient(amqp_url) as owed:
        await owed.send(
            "training", "wait_file", {"path": str(gate), "journal": str(journal)}, task_id="owed"
        )
        await until_journaled(journal, 1)
        assert owed.replies_owed == 1
    assert await _queue_exists(amqp_url, owed.reply_queue)

    # Unless the client is told to delete it whatever is owed.
    async with SwarmClient(amqp_url, delete_reply_queue=True) as one_shot:
        with pytest.raises(ReplyTimeout):
            await one_shot.submit("training", "wait_file", {"path": str(gate)}, wait_s=0.1)
        assert one_shot.replies_owed == 1
    assert not await _queue_exists(amqp_url, one_shot.reply_queue)
    gate.touch()


async def test_client_cancel(start_daemon: DaemonFactory, amqp_url: str, tmp_path: Path) -> None:
    await start_daemon(handler_modules=DIAGNOSTICS)
    journal = tmp_path / "runs"
    async with SwarmClient(amqp_url) as client:
        future = await client.send(
            "training",
            "wait_file",
            {"path": str(tmp_path / "never"), "journal": str(journal)},
            task_id="to-cancel",
        )
        await until_journaled(journal, 1)
        assert await client.cancel("to-cancel") == {"id": "to-cancel", "state": "running"}
        assert (await asyncio.wait_for(future, 60)).status == "cancelled"
        # Too late now; the reply may reach us before its outcome is recorded ("finishing").
        too_late = await client.cancel("to-cancel")
        assert too_late in (
            {"id": "to-cancel", "state": "finished", "status": "cancelled"},
            {"id": "to-cancel", "state": "finishing"},
        )


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_client_example() -> str:
    section = README.read_text().split("\n## Python client", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    [example] = [block for block in blocks if "asyncio.run" in block]
    return str(example)


async def test_the_readme_client_example_runs_as_written(daemon: Daemon, amqp_url: str) -> None:
    example = readme_client_example()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        example,
        env={**os.environ, "AMQP_URL": amqp_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0] == "ok {'x': 1}" and lines[1] == "499500"
    assert "'state'" in lines[2] and lines[3] == "{'seconds': 1}"
