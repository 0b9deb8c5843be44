"""`swarm dead` as an operator runs it, against the real daemon, RabbitMQ and Ray: reading removes
nothing, a letter shows its body and traceback, a replay after the fix is answered `ok` on its
original reply_to, a task that succeeded is never run again, purge asks first."""

import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from conftest import DaemonFactory
from daemon_process import SWARM
from raw import RawProducer, task

from broker.daemon import Daemon
from schemas.topology import DEAD_QUEUE

DIAGNOSTICS = ["workers.diagnostics"]


async def _swarm(*args: str, amqp_url: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, so that the in-process daemon's loop goes on meanwhile."""
    env = {**os.environ, "AMQP_URL": amqp_url}
    process = await asyncio.create_subprocess_exec(
        SWARM,
        "dead",
        *args,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 120)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


async def _dead_lettered(daemon: Daemon, count: int) -> None:
    """Until swarm.dead confirmed `count` dead letters (the daemon counts them as it does)."""
    assert daemon.ingress is not None
    stats = daemon.ingress.publish_stats

    async def until() -> None:
        # Polled: the count has no event; the reply comes before the dead letter.
        while sum(stats.dead_letters.values()) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    await asyncio.wait_for(until(), 60)


async def _held(producer: RawProducer) -> int:
    """Letters in swarm.dead, as the queue itself counts them (a passive declare)."""
    queue = await producer.channel.declare_queue(DEAD_QUEUE, passive=True)
    return queue.declaration_result.message_count or 0


async def _fail_three(daemon: Daemon, producer: RawProducer) -> list[dict[str, Any]]:
    """Two tasks for a handler nobody registered and one whose handler raises."""
    inbox = await producer.inbox()
    bodies = [
        task("inference", "no_such_handler", {"n": 1}, id="unknown-1"),
        task("inference", "no_such_handler", {"n": 2}, id="unknown-2"),
        task("data_processing", "fail", {"message": "boom"}, id="raised-1"),
    ]
    for body in bodies:
        await producer.publish(body["type"], body, reply_to=inbox.name)
    await inbox.wait_for(3)
    await _dead_lettered(daemon, 3)
    return bodies


async def test_ls_counts_by_code_handler_and_queue_and_removes_nothing(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str
) -> None:
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    await _fail_three(daemon, producer)
    for _ in range(2):  # the second read sees what the first saw
        done = await _swarm("ls", "--json", amqp_url=amqp_url)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == [
            {
                "code": "unknown_handler",
                "handler": "no_such_handler",
                "queue": "swarm.tasks.inference",
                "count": 2,
            },
            {
                "code": "handler_error",
                "handler": "fail",
                "queue": "swarm.tasks.data_processing",
                "count": 1,
            },
        ]
    assert await _held(producer) == 3
    filtered = await _swarm("ls", "--each", "--json", "--code", "handler_error", amqp_url=amqp_url)
    [row] = json.loads(filtered.stdout)
    assert (row["id"], row["error"], row["attempts"]) == ("raised-1", "HandlerFailure: boom", 1)
    assert 0 <= row["age_s"] < 600
    newer = await _swarm("ls", "--json", "--older-than", "3600", amqp_url=amqp_url)
    assert json.loads(newer.stdout) == []


async def test_show_prints_the_body_headers_and_traceback(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str
) -> None:
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    await _fail_three(daemon, producer)
    done = await _swarm("show", "raised-1", amqp_url=amqp_url)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["body"]["handler"] == "fail" and shown["body"]["args"] == {"message": "boom"}
    assert shown["code"] == "handler_error"
    assert shown["headers"]["x-swarm-source-queue"] == "swarm.tasks.data_processing"
    assert shown["traceback"].startswith("Traceback (most recent call last):")
    assert shown["traceback"].endswith("HandlerFailure: boom")
    missing = await _swarm("show", "no-such-task", amqp_url=amqp_url)
    assert missing.returncode == 1
    assert "no dead letter of task 'no-such-task'" in missing.stderr
    assert await _held(producer) == 3


async def test_a_letter_replayed_after_the_fix_is_answered_ok_on_its_reply_to(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str, tmp_path: Path
) -> None:
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    inbox = await producer.inbox()
    # Fails its first run (no retries allowed), succeeds from the second on: "the fix".
    body = task("inference", "flaky", {"path": str(tmp_path / "runs"), "failures": 1}, id="fixed-1")
    body["max_retries"] = 0
    correlation_id = await producer.publish("inference", body, reply_to=inbox.name)
    first = await inbox.one()
    assert first.payload["status"] == "error"
    await _dead_lettered(daemon, 1)

    dry = await _swarm("replay", "--id", "fixed-1", "--dry-run", amqp_url=amqp_url)
    assert dry.returncode == 0, dry.stderr
    assert "would replay fixed-1 (handler_error) to swarm.tasks.inference" in dry.stdout
    assert await _held(producer) == 1

    done = await _swarm("replay", "--id", "fixed-1", amqp_url=amqp_url)
    assert done.returncode == 0, done.stderr
    assert "replayed 1 dead letter(s)" in done.stdout
    again = (await inbox.wait_for(2))[1]
    assert again.payload["status"] == "ok"
    assert again.payload["id"] == "fixed-1" and again.payload["result"] == {"runs": 2}
    assert again.message.correlation_id == correlation_id
    assert await _held(producer) == 0  # removed once the republish was confirmed
    # The id's stored outcome is now the ok one: a duplicate gets it, without a run.
    await producer.publish("inference", body, reply_to=inbox.name)
    duplicate = (await inbox.wait_for(3))[2]
    assert duplicate.payload["status"] == "ok"
    assert (tmp_path / "runs").read_text().count("run") == 2


async def test_a_replayed_task_that_had_succeeded_is_answered_from_the_store_not_run(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str, tmp_path: Path
) -> None:
    """Its reply_to did not exist: an ok outcome dead-lettered reply_undeliverable."""
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    journal = tmp_path / "runs"
    reply_queue = f"gone-{uuid.uuid4().hex[:8]}"
    body = task("inference", "journal", {"path": str(journal), "entry": "once"}, id="ok-1")
    await producer.publish("inference", body, reply_to=reply_queue)
    await _dead_lettered(daemon, 1)
    inbox = await producer.inbox(reply_queue)  # the producer is back
    done = await _swarm("replay", "--code", "reply_undeliverable", amqp_url=amqp_url)
    assert done.returncode == 0, done.stderr
    reply = await inbox.one()
    assert reply.payload["status"] == "ok" and reply.payload["result"] == "once"
    assert journal.read_text().split() == ["once"]  # never run again


async def test_purge_removes_only_what_the_filter_chose_and_asks_first(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str
) -> None:
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    await _fail_three(daemon, producer)
    unasked = await _swarm("purge", "--code", "unknown_handler", amqp_url=amqp_url)
    assert unasked.returncode == 2
    assert "add --yes" in unasked.stderr
    assert await _held(producer) == 3
    done = await _swarm("purge", "--code", "unknown_handler", "--yes", amqp_url=amqp_url)
    assert done.returncode == 0, done.stderr
    assert "removed 2 dead letter(s)" in done.stdout
    assert await _held(producer) == 1
    left = await _swarm("ls", "--each", "--json", amqp_url=amqp_url)
    assert [row["id"] for row in json.loads(left.stdout)] == ["raised-1"]
