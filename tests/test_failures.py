"""Run-time failures: time limits, lost workers and retries on a healthy actor."""

from pathlib import Path

from conftest import DaemonFactory
from raw import RawProducer, task


async def test_timeout_stops_the_run_and_is_final(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    await start_daemon()
    inbox = await producer.inbox()
    dead = await producer.watch_dead()
    await producer.publish(
        "training", task("training", "sleep", {"seconds": 30}, timeout_s=0.2), reply_to=inbox.name
    )
    payload = (await inbox.one()).payload
    assert payload["status"] == "error"
    assert payload["error"]["code"] == "timeout"
    assert payload["attempts"] == 1
    assert (await dead.one()).headers["x-swarm-error-code"] == "timeout"


async def test_lost_worker_is_retried_on_a_fresh_actor(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    daemon = await start_daemon(handler_modules=["workers.diagnostics"], retry_backoff_s=0.01)
    actors_before = {a.key for a in daemon.pools.actors("cpu")}
    inbox = await producer.inbox()
    marker = str(tmp_path / "crashed-once")
    await producer.publish(
        "inference", task("inference", "crash_once", {"marker": marker}), reply_to=inbox.name
    )
    payload = (await inbox.one()).payload
    assert payload["status"] == "ok"
    assert payload["result"]["retried"] is True
    assert payload["attempts"] == 2
    actors_after = {a.key for a in daemon.pools.actors("cpu")}
    assert actors_after and actors_after.isdisjoint(actors_before)


async def test_worker_lost_after_retries_run_out(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    await start_daemon(handler_modules=["workers.diagnostics"], retry_backoff_s=0.01)
    inbox = await producer.inbox()
    dead = await producer.watch_dead()
    await producer.publish(
        "inference", task("inference", "crash", max_retries=2), reply_to=inbox.name
    )
    payload = (await inbox.one()).payload
    assert payload["status"] == "error"
    assert payload["error"]["code"] == "worker_lost"
    assert payload["error"]["retryable"] is True
    assert payload["attempts"] == 3
    letter = await dead.one()
    assert letter.headers["x-swarm-error-code"] == "worker_lost"
    assert letter.headers["x-swarm-attempts"] == 3
