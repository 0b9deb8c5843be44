"""The handler SDK end to end: typed args, per-actor set-up, context, progress, typed batches."""

import asyncio

import pytest
from conftest import DaemonFactory
from raw import RawProducer, task

from broker.daemon import Daemon
from broker.producer.client import SwarmClient
from schemas.progress import ProgressMessage

DIAGNOSTICS = ["workers.diagnostics"]


@pytest.fixture
async def sdk_daemon(start_daemon: DaemonFactory) -> Daemon:
    # One CPU actor, so that "once per actor" is checkable.
    return await start_daemon(handler_modules=DIAGNOSTICS, cpu_pool_min=1, cpu_pool_max=1)


async def test_typed_args_are_validated_into_the_model(
    sdk_daemon: Daemon, producer: RawProducer
) -> None:
    inbox = await producer.inbox()
    dead = await producer.watch_dead()
    await producer.publish(
        "inference", task(handler="typed_norm", args={"x": 3, "y": 4}), reply_to=inbox.name
    )
    ok = (await inbox.one()).payload
    assert ok["status"] == "ok"
    assert ok["result"] == {"norm": 5.0, "model": "Point"}

    bad = task(handler="typed_norm", args={"x": "three"})
    await producer.publish("inference", bad, reply_to=inbox.name)
    await inbox.wait_for(2)
    error = inbox.messages[1].payload
    assert error["status"] == "error"
    assert error["error"]["code"] == "invalid"
    assert "typed_norm" in error["error"]["message"] and "y" in error["error"]["message"]
    letter = await dead.one()
    assert letter.headers["x-swarm-error-code"] == "invalid"


async def test_setup_runs_once_per_actor_and_context_describes_the_run(
    sdk_daemon: Daemon, amqp_url: str
) -> None:
    async with SwarmClient(amqp_url, reply_timeout_s=60) as client:
        replies = await asyncio.gather(
            *(client.submit("training", "with_setup", {}, task_id=f"setup-{n}") for n in range(12))
        )
    assert all(r.status == "ok" for r in replies), [r.error for r in replies]
    results = [r.result for r in replies]
    assert {r["state"]["setups_in_this_actor"] for r in results} == {1}
    assert len({r["pid"] for r in results}) == 1, "one actor ran them all"
    assert {r["state"]["loaded_in"] for r in results} == {results[0]["pid"]}
    assert sorted(r["task_id"] for r in results) == sorted(f"setup-{n}" for n in range(12))
    assert {(r["task_type"], r["attempt"], r["pool"], r["device"]) for r in results} == {
        ("training", 1, "cpu", "cpu")
    }


@pytest.mark.parametrize("handler", ["steps", "async_steps"])
async def test_progress_reaches_the_reply_queue_before_the_reply(
    sdk_daemon: Daemon, amqp_url: str, handler: str
) -> None:
    seen: list[ProgressMessage] = []
    async with SwarmClient(amqp_url, reply_timeout_s=60) as client:
        future = await client.send(
            "training",
            handler,
            {"steps": 5},
            task_id=f"progress-{handler}",
            on_progress=seen.append,
        )
        reply = await asyncio.wait_for(future, 60)
    assert reply.status == "ok" and reply.result == {"done": 5}
    assert [p.seq for p in seen] == [1, 2, 3, 4, 5]
    assert [p.progress["step"] for p in seen] == [1, 2, 3, 4, 5]
    assert {(p.id, p.status, p.attempt) for p in seen} == {(f"progress-{handler}", "progress", 1)}


async def test_progress_on_the_wire_is_opt_in_and_never_a_final_status(
    sdk_daemon: Daemon, producer: RawProducer
) -> None:
    inbox = await producer.inbox()
    results = await producer.watch_results()
    plain = task("training", "steps", {"steps": 3})
    await producer.publish("training", plain, reply_to=inbox.name)
    only_reply = await inbox.one()
    assert only_reply.payload["status"] == "ok", "without the header: the reply alone"

    asked = task("training", "steps", {"steps": 3})
    correlation_id = await producer.publish(
        "training", asked, reply_to=inbox.name, headers={"x-swarm-progress": 1}
    )
    await inbox.wait_until(lambda m: m[-1].payload["status"] == "ok" and len(m) > 1)
    after = inbox.messages[1:]
    assert [m.headers["x-swarm-status"] for m in after] == ["progress"] * 3 + ["ok"]
    assert {m.message.correlation_id for m in after} == {correlation_id}
    progress = after[0].payload
    assert set(progress) == {"v", "id", "status", "progress", "seq", "attempt"}
    assert progress["id"] == asked["id"] and progress["progress"] == {"step": 1, "of": 3}
    await results.wait_for(2)
    assert {m.payload["status"] for m in results.messages} == {"ok"}, "no progress copies"


async def test_typed_batch_handler_shares_one_setup_and_answers_each_task(
    sdk_daemon: Daemon, amqp_url: str
) -> None:
    async with SwarmClient(amqp_url, reply_timeout_s=60) as client:
        futures = [
            await client.send("inference", "batch_typed", {"x": n, "y": 1}) for n in range(8)
        ]
        futures.append(await client.send("inference", "batch_typed", {"x": "bad"}))
        replies = await asyncio.gather(*futures)
    good, bad = replies[:8], replies[8]
    assert [r.result["sum"] for r in good] == [n + 1 for n in range(8)]
    assert max(r.result["batch"] for r in good) > 1, "runs were batched"
    assert {r.result["state"]["setups_in_this_actor"] for r in good} == {1}
    assert bad.status == "error" and bad.error is not None and bad.error.code == "invalid"
