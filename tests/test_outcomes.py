"""One outcome per task id, cancels, and the retry signal."""

import asyncio
from pathlib import Path

import aio_pika
import msgpack
from conftest import DaemonFactory, journaled, until_journaled, when_waiting
from raw import RawProducer, task

from broker.daemon import Daemon
from broker.tasks.active import ActiveTask

DIAGNOSTICS = ["workers.diagnostics"]


def runs(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def test_a_republished_id_gets_the_stored_reply_and_never_runs_again(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    await start_daemon(handler_modules=DIAGNOSTICS)
    log = tmp_path / "runs"
    first_inbox, second_inbox = await producer.inbox(), await producer.inbox()
    results = await producer.watch_results()
    body = task("data_processing", "journal", {"path": str(log), "entry": "once"}, id="dup-1")
    await producer.publish(
        "data_processing", body, reply_to=first_inbox.name, correlation_id="first"
    )
    first = await first_inbox.one()
    await producer.publish(
        "data_processing", body, reply_to=second_inbox.name, correlation_id="second"
    )
    second = await second_inbox.one()
    assert second.body == first.body  # the stored reply, byte for byte
    assert second.message.correlation_id == "second"
    assert runs(log) == 1
    await results.wait_for(2)  # the duplicate's reply is copied too


def when_found_in_progress(daemon: Daemon, task_id: str) -> asyncio.Event:
    """An event set once a delivery of `task_id` finds a run of that id in progress in
    `daemon` (the duplicate check's in-flight branch); the processor's own lookup, chained."""
    found = asyncio.Event()
    forward = daemon.tasks.active.get

    def get(looked_up: str) -> ActiveTask | None:
        active = forward(looked_up)
        if active is not None and looked_up == task_id:
            found.set()
        return active

    daemon.tasks.active.get = get  # type: ignore[method-assign]
    return found


async def test_the_same_id_twice_at_once_runs_once(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    gate, journal = tmp_path / "gate", tmp_path / "runs"
    in_progress = when_found_in_progress(daemon, "same")
    inbox = await producer.inbox()
    body = task("training", "wait_file", {"path": str(gate), "journal": str(journal)}, id="same")
    await producer.publish("training", body, reply_to=inbox.name)
    await producer.publish("training", body, reply_to=inbox.name)
    # The first cannot end before its gate opens, and the gate opens only once the second
    # delivery found the first in progress: the two overlap by construction, not by chance.
    await asyncio.wait_for(in_progress.wait(), 60)
    gate.touch()
    first, second = await inbox.wait_for(2)
    # One run: the second waited for the first's outcome and got its bytes.
    assert first.body == second.body
    assert msgpack.unpackb(first.body)["attempts"] == 1
    runs = journaled(journal)
    assert [event for event, _ in runs] == ["started", "finished"], runs


async def test_outcomes_survive_a_daemon_restart(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    body = task("inference", "journal", {"path": str(log)}, id="survivor")
    first_daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    inbox = await producer.inbox()
    await producer.publish("inference", body, reply_to=inbox.name)
    original = await inbox.one()
    await first_daemon.stop()

    await start_daemon(handler_modules=DIAGNOSTICS)
    again = await producer.inbox()
    await producer.publish("inference", body, reply_to=again.name)
    assert (await again.one()).body == original.body
    assert runs(log) == 1


async def _control(producer: RawProducer, request: dict[str, object]) -> dict[str, object]:
    inbox = await producer.inbox()
    await producer.channel.default_exchange.publish(
        aio_pika.Message(
            msgpack.packb(request), content_type="application/msgpack", reply_to=inbox.name
        ),
        "swarm.control",
    )
    payload = (await inbox.one()).payload
    assert payload["status"] == "ok", payload
    return payload["result"]  # type: ignore[no-any-return]


async def test_cancel_a_running_task(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    await start_daemon(handler_modules=DIAGNOSTICS)
    gate, journal = tmp_path / "gate", tmp_path / "runs"
    inbox = await producer.inbox()
    dead = await producer.watch_dead()
    args = {"path": str(gate), "journal": str(journal)}
    await producer.publish(
        "training", task("training", "wait_file", args, id="long"), reply_to=inbox.name
    )
    await until_journaled(journal, 1)  # the handler began in the actor: certainly running
    answer = await _control(producer, {"v": 1, "op": "cancel", "id": "long"})
    assert answer == {"id": "long", "state": "running"}
    payload = (await inbox.one()).payload
    assert payload["status"] == "cancelled"
    assert payload["error"]["code"] == "cancelled"
    # The actor is free again: a task placed now runs at once.
    await producer.publish("training", task("training", "echo", "next"), reply_to=inbox.name)
    assert (await inbox.wait_for(2))[1].payload["result"] == "next"
    assert not dead.messages  # cancelled outcomes are not dead-lettered


async def test_cancel_a_waiting_task(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    gate, log = tmp_path / "gate", tmp_path / "runs"
    inbox = await producer.inbox()
    waiting = when_waiting(daemon, 1)
    await producer.publish(
        "training",
        task("training", "wait_file", {"path": str(gate)}, id="blocker"),
        reply_to=inbox.name,
    )
    await producer.publish(
        "training",
        task("training", "journal", {"path": str(log)}, id="queued"),
        reply_to=inbox.name,
    )
    await asyncio.wait_for(waiting.wait(), 60)
    answer = await _control(producer, {"v": 1, "op": "cancel", "id": "queued"})
    assert answer == {"id": "queued", "state": "waiting"}
    cancelled = await inbox.one()
    assert cancelled.payload["status"] == "cancelled"
    assert cancelled.payload["attempts"] == 0
    gate.touch()
    await inbox.wait_for(2)
    assert runs(log) == 0


async def test_cancel_before_arrival_is_remembered_even_across_a_restart(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    first = await start_daemon(handler_modules=DIAGNOSTICS)
    answer = await _control(producer, {"v": 1, "op": "cancel", "id": "future"})
    assert answer["state"] == "unseen"
    await first.stop()
    await start_daemon(handler_modules=DIAGNOSTICS)
    log = tmp_path / "runs"
    inbox = await producer.inbox()
    await producer.publish(
        "inference",
        task("inference", "journal", {"path": str(log)}, id="future"),
        reply_to=inbox.name,
    )
    assert (await inbox.one()).payload["status"] == "cancelled"
    assert runs(log) == 0
    finished = await _control(producer, {"v": 1, "op": "cancel", "id": "future"})
    assert finished == {"id": "future", "state": "finished", "status": "cancelled"}


async def test_retry_signal_runs_again_after_its_delay(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    await start_daemon(handler_modules=DIAGNOSTICS)
    inbox = await producer.inbox()
    ok = {"path": str(tmp_path / "ok"), "failures": 2}
    never = {"path": str(tmp_path / "never"), "failures": 99}
    await producer.publish(
        "inference", task("inference", "flaky", ok, id="flaky-ok"), reply_to=inbox.name
    )
    await producer.publish(
        "inference",
        task("inference", "flaky", never, id="flaky-never", max_retries=2),
        reply_to=inbox.name,
    )
    replies = {r.payload["id"]: r.payload for r in await inbox.wait_for(2)}
    assert replies["flaky-ok"]["status"] == "ok"
    assert replies["flaky-ok"]["attempts"] == 3
    assert replies["flaky-never"]["status"] == "error"
    assert replies["flaky-never"]["error"]["code"] == "handler_error"
    assert replies["flaky-never"]["error"]["retryable"] is True
    assert replies["flaky-never"]["attempts"] == 3


async def test_timeouts_are_retried_when_configured(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    await start_daemon(retry_timeouts=True, retry_backoff_s=0.01)
    inbox = await producer.inbox()
    await producer.publish(
        "inference",
        task("inference", "sleep", {"seconds": 60}, timeout_s=0.1, max_retries=2),
        reply_to=inbox.name,
    )
    payload = (await inbox.one()).payload
    assert payload["error"]["code"] == "timeout"
    assert payload["attempts"] == 3
    assert payload["error"]["retryable"] is True


async def test_a_stuck_sync_handler_gets_its_actor_retired(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    before = {a.key for a in daemon.pools.actors("cpu")}
    inbox = await producer.inbox()
    await producer.publish(
        "data_processing",
        task("data_processing", "block", {"seconds": 30}, timeout_s=0.2),
        reply_to=inbox.name,
    )
    assert (await inbox.one()).payload["error"]["code"] == "timeout"
    await producer.publish("data_processing", task("data_processing", "pid"), reply_to=inbox.name)
    assert (await inbox.wait_for(2))[1].payload["status"] == "ok"
    after = {a.key for a in daemon.pools.actors("cpu")}
    assert after.isdisjoint(before)  # the blocked actor was stopped and replaced
