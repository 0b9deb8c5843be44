"""broker.tasks.processor (with broker.tasks.active): retries, deadlines, cancels, leases, progress,
lost workers, stuck sync handlers, duplicates and refusals, on in-memory fakes (tests/unit/fakes):
no RabbitMQ, no Ray. Every run is answered by the test, so each branch is reached on purpose."""

import asyncio
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fakes.pools import ASYNC, BLOCKING_SYNC, INLINE_SYNC, REPORTS_PROGRESS, failed
from fakes.swarm import (
    MemorySwarm,
    RecordingSettlement,
    delivery,
    quick_settings,
    task_body,
)
from fakes.sync import FakeClock

import broker.tasks.intake
import broker.tasks.processor
from broker.tasks.delivery import Delivery
from broker.tasks.outcome import Outcome
from schemas.codec import decode, encode
from schemas.topology import PROGRESS_HEADER, task_queue

OUTCOME_TIMEOUT_S = 5.0


@pytest.fixture
async def make_swarm(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Callable[..., MemorySwarm]]:
    """MemorySwarms for one test, each closed at its end (see MemorySwarm.close)."""
    made: list[MemorySwarm] = []

    def make(**options: Any) -> MemorySwarm:
        made.append(MemorySwarm(monkeypatch, **options))
        return made[-1]

    yield make
    for swarm in made:
        await swarm.close()


@pytest.fixture
def swarm(make_swarm: Callable[..., MemorySwarm]) -> MemorySwarm:
    """The processor and its fakes; the ingress is not started (these tests hand the
    processor its deliveries themselves)."""
    return make_swarm()


def start(swarm: MemorySwarm, task: Delivery) -> "asyncio.Task[Outcome]":
    return swarm.process(task)


async def outcome_of(processing: "asyncio.Task[Outcome]") -> Outcome:
    return await asyncio.wait_for(processing, OUTCOME_TIMEOUT_S)


def reply(outcome: Outcome) -> dict[str, Any]:
    body = decode(outcome.reply_body)
    assert isinstance(body, dict)
    return body


def assert_nothing_held(swarm: MemorySwarm) -> None:
    """Every run gave its room back and no task is left in progress."""
    for load in swarm.scheduler.ledger.actors.values():
        assert load.running == 0, f"{load.info.key} still runs {load.running}"
    assert swarm.scheduler.waiting("cpu") == 0


# == Deadlines and cancels between retries ======================================================


async def test_a_deadline_passing_during_the_backoff_answers_expired_without_another_run(
    swarm: MemorySwarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(broker.tasks.intake, "time", clock)
    processing = start(swarm, delivery(task_body("t", deadline=clock.now_s + 10)))
    first = await swarm.pools.next_call()
    clock.advance(60)  # the deadline passes while the first run fails and backs off
    first.fail(message="asked to retry", retry_delay_s=0)

    outcome = await outcome_of(processing)
    assert outcome.status == "expired"
    assert outcome.error_code == "expired"
    assert outcome.attempts == 1
    assert reply(outcome)["attempts"] == 1
    assert len(swarm.pools.calls) == 1
    assert outcome.recorded  # a final outcome: a duplicate is answered from the store
    assert_nothing_held(swarm)


@pytest.mark.parametrize("backoff", ["handler_delay", "lost_worker_backoff"])
async def test_a_cancel_during_the_backoff_answers_cancelled_and_never_runs_again(
    make_swarm: Callable[..., MemorySwarm], monkeypatch: pytest.MonkeyPatch, backoff: str
) -> None:
    # Exponential backoff's full jitter drawn at its top: an hour, never over before the cancel.
    monkeypatch.setattr(broker.tasks.processor, "random", SimpleNamespace(uniform=lambda a, b: b))
    swarm = make_swarm(settings=quick_settings(retry_backoff_s=3600.0))
    processing = start(swarm, delivery(task_body("t")))
    first = await swarm.pools.next_call()
    if backoff == "handler_delay":
        first.fail(message="asked to retry", retry_delay_s=3600.0)
    else:
        first.lose()
    # reap() ends each attempt, after which the processor goes straight into its backoff.
    await swarm.until(lambda: swarm.pools.runs_ended == 1, "the first run to end")

    assert swarm.processor.active.cancel("t") == "waiting"
    outcome = await outcome_of(processing)
    assert outcome.status == "cancelled"
    assert outcome.error_code == "cancelled"
    assert outcome.attempts == 1
    assert len(swarm.pools.calls) == 1
    assert swarm.pools.retired == []  # nothing was running: no actor to retire
    assert_nothing_held(swarm)


async def test_a_cancel_while_the_outcome_is_published_finds_it_finishing_and_changes_nothing(
    make_swarm: Callable[..., MemorySwarm],
) -> None:
    swarm = make_swarm()
    await swarm.start()
    held = swarm.broker.hold(routing_key="replies")
    message = swarm.send(task_body("t"))
    (await swarm.pools.next_call()).succeed("done")
    await held.wait_entered()

    assert await swarm.control.cancel("t") == {"id": "t", "state": "finishing"}
    held.release()
    await swarm.settled(message)
    assert message.acked
    assert [r["status"] for r in swarm.replies()] == ["ok"]
    assert await swarm.control.cancel("t") == {"id": "t", "state": "finished", "status": "ok"}


# == Leases =====================================================================================


async def test_a_failed_lease_renewal_keeps_the_delivery_held_and_is_tried_again(
    make_swarm: Callable[..., MemorySwarm],
) -> None:
    swarm = make_swarm(settings=quick_settings(lease_renew_s=0.005))
    settlement = RecordingSettlement(swarm.changes)
    renewals: list[tuple[str, list[str]]] = []  # (lease number, the delivery's settlement then)

    async def renew(task: Delivery, lease: str) -> None:
        renewals.append((lease.partition(".")[0], list(settlement.calls)))
        swarm.changes.notify()
        if len(renewals) == 1:
            raise ConnectionError("RabbitMQ refused the copy")

    swarm.processor.renew = renew
    processing = start(swarm, delivery(task_body("t"), settlement=settlement))
    call = await swarm.pools.next_call()
    await swarm.until(lambda: settlement.calls == ["ack"], "the delivery to be acked")

    # The same lease again, and the delivery still held when it was tried again.
    assert renewals[:2] == [("1", []), ("1", [])]
    call.succeed()
    outcome = await outcome_of(processing)
    assert outcome.status == "ok"
    assert settlement.calls == ["ack"]


async def test_renewal_copies_are_held_while_the_task_runs_and_acked_with_its_outcome(
    make_swarm: Callable[..., MemorySwarm],
) -> None:
    """The whole lease path in memory: the copy republished (sealed), consumed back, its seal
    verified, held by the running task, settled at the next renewal or with the outcome."""
    swarm = make_swarm(settings=quick_settings(lease_renew_s=0.01))
    await swarm.start()
    message = swarm.send(task_body("t"))
    call = await swarm.pools.next_call()
    queue = swarm.broker.queue(task_queue("data_processing"))
    await swarm.until(lambda: len(queue.delivered) >= 3, "two renewal copies to arrive")
    assert message.acked  # its first copy carries the task now

    call.succeed("done")
    await swarm.until(lambda: all(m.acked for m in queue.delivered), "every copy to be acked")
    assert all("requeued" not in m.history for m in queue.delivered)
    assert len(swarm.pools.calls) == 1
    assert [r["result"] for r in swarm.replies()] == ["done"]


# == Progress across retries ====================================================================


@pytest.mark.parametrize("first_end", ["lost_worker", "retry"])
async def test_progress_is_numbered_per_attempt_across_a_retry(
    swarm: MemorySwarm, first_end: str
) -> None:
    sent: list[dict[str, Any]] = []
    swarm.processor.publish_progress = lambda task, body: sent.append(decode(body))
    task = delivery(task_body("t", handler=REPORTS_PROGRESS.name), headers={PROGRESS_HEADER: True})
    processing = start(swarm, task)
    first = await swarm.pools.next_call()
    first.report({"step": 1})
    first.report({"step": 2})
    if first_end == "lost_worker":
        first.lose()
    else:
        first.fail(message="asked to retry", retry_delay_s=0)
    second = await swarm.pools.next_call()
    second.report({"step": 3})
    second.succeed("done")

    outcome = await outcome_of(processing)
    assert outcome.status == "ok" and outcome.attempts == 2
    assert first.streaming and second.streaming
    assert [(m["progress"], m["seq"], m["attempt"]) for m in sent] == [
        ({"step": 1}, 1, 1),
        ({"step": 2}, 2, 1),
        ({"step": 3}, 1, 2),
    ]
    assert {m["id"] for m in sent} == {"t"} and {m["status"] for m in sent} == {"progress"}
    if first_end == "lost_worker":
        assert swarm.pools.lost == [first.actor.key]
        assert second.actor.key != first.actor.key


async def test_progress_is_not_streamed_unless_the_producer_asked(swarm: MemorySwarm) -> None:
    processing = start(swarm, delivery(task_body("t", handler=REPORTS_PROGRESS.name)))
    call = await swarm.pools.next_call()
    assert not call.streaming
    call.succeed()
    assert (await outcome_of(processing)).status == "ok"


# == Lost workers ===============================================================================


@pytest.mark.parametrize(
    ("max_retries", "attempts"), [(0, 1), (1, 2), (None, 3)], ids=["none", "one", "default"]
)
async def test_a_worker_lost_on_every_attempt_gives_up_with_worker_lost(
    make_swarm: Callable[..., MemorySwarm], max_retries: int | None, attempts: int
) -> None:
    swarm = make_swarm(settings=quick_settings(default_max_retries=2))
    fields: dict[str, Any] = {} if max_retries is None else {"max_retries": max_retries}
    processing = start(swarm, delivery(task_body("t", **fields)))
    calls = []
    for _ in range(attempts):
        call = await swarm.pools.next_call()
        calls.append(call)
        call.lose()

    outcome = await outcome_of(processing)
    assert outcome.status == "error"
    assert outcome.error_code == "worker_lost"
    assert outcome.attempts == attempts
    assert f"gave up after {attempts} attempts" in (outcome.error_message or "")
    assert reply(outcome)["error"]["retryable"] is True
    assert outcome.dead_letter and outcome.recorded
    assert [c.attempt for c in calls] == list(range(1, attempts + 1))
    # Each lost actor left the ledger; every retry ran on a fresh one.
    assert swarm.pools.lost == [c.actor.key for c in calls]
    assert len({c.actor.key for c in calls}) == attempts
    assert_nothing_held(swarm)


# == Stuck sync handlers ========================================================================

KINDS = [
    pytest.param(BLOCKING_SYNC, True, id="sync-on-a-thread"),
    pytest.param(ASYNC, False, id="async"),
    pytest.param(INLINE_SYNC, False, id="inline-sync"),
]


@pytest.mark.parametrize(("handler", "retired"), KINDS)
async def test_a_cancel_retires_the_actor_only_under_a_blocking_sync_handler(
    swarm: MemorySwarm, handler: Any, retired: bool
) -> None:
    processing = start(swarm, delivery(task_body("t", handler=handler.name)))
    call = await swarm.pools.next_call()
    assert swarm.processor.active.cancel("t") == "running"

    outcome = await outcome_of(processing)
    assert outcome.status == "cancelled"
    assert call.cancelled
    assert swarm.pools.retired == ([call.actor.key] if retired else [])
    # A retired actor is stopped once its run is over and takes nothing new.
    assert (call.actor.key in swarm.scheduler.ledger.actors) is not retired
    assert_nothing_held(swarm)


@pytest.mark.parametrize(("handler", "retired"), KINDS)
async def test_a_timeout_retires_the_actor_only_under_a_blocking_sync_handler(
    swarm: MemorySwarm, handler: Any, retired: bool
) -> None:
    processing = start(swarm, delivery(task_body("t", handler=handler.name, timeout_s=1)))
    call = await swarm.pools.next_call()
    call.fail("timeout", "run exceeded its time limit of 1 s")

    outcome = await outcome_of(processing)
    assert outcome.status == "error" and outcome.error_code == "timeout"
    assert reply(outcome)["error"]["retryable"] is True
    assert outcome.attempts == 1  # retry_timeouts is off: final
    assert swarm.pools.retired == ([call.actor.key] if retired else [])
    assert (call.actor.key in swarm.scheduler.ledger.actors) is not retired
    assert_nothing_held(swarm)


# == Results msgpack cannot carry ==============================================================
# A result is encoded inside the actor (workers/results.py, from WorkerActor.run), so a value
# msgpack cannot encode fails there, as that run's handler_error; the daemon never decodes it.


@pytest.fixture
def handler_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"swarm_unencodable_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from workers.registry import handler

            @handler("returns_an_object", blocking=False)
            def returns_an_object(args):
                return object()

            @handler("reports_an_object")
            async def reports_an_object(args, ctx):
                ctx.progress(object())
                return "never"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.fixture
def actor_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """What WorkerActor reads of Ray's runtime context, without a Ray."""
    import ray

    context = SimpleNamespace(get_node_id=lambda: "node-1", get_accelerator_ids=lambda: {"GPU": []})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)


@pytest.mark.usefixtures("actor_context")
async def test_a_result_msgpack_cannot_encode_fails_the_run_as_a_handler_error(
    handler_module: str,
) -> None:
    from workers.actor import WorkerActor

    actor = WorkerActor("cpu", [handler_module])
    result = await actor.run("returns_an_object", "inference", None, None)
    assert not result.ok
    assert result.error_code == "handler_error"
    assert "not msgpack-serializable" in (result.error_message or "")
    assert result.retry_delay_s is None  # not retried: it would fail the same way

    # A progress report is encoded in the handler's own call: it fails the run the same way.
    run = actor.run_streaming("reports_an_object", "inference", None, None, "t", 1)
    streamed = [item async for item in run]
    assert len(streamed) == 1  # no progress message, only the final outcome
    (final,) = streamed
    assert not final.ok and final.error_code == "handler_error"
    assert "cannot encode object of type object" in (final.error_message or "")


async def test_a_result_that_could_not_be_encoded_is_a_final_dead_lettered_error(
    swarm: MemorySwarm,
) -> None:
    message = "result is not msgpack-serializable: TypeError: cannot encode object of type object"
    swarm.pools.answer(failed("handler_error", message))
    outcome = await outcome_of(start(swarm, delivery(task_body("t"))))
    assert outcome.status == "error" and outcome.error_code == "handler_error"
    error = {"code": "handler_error", "message": message, "retryable": False}
    assert reply(outcome)["error"] == error
    assert outcome.attempts == 1 and len(swarm.pools.calls) == 1
    assert outcome.dead_letter and outcome.recorded


# == Duplicates and refusals ====================================================================


@pytest.mark.parametrize("redelivered", [False, True], ids=["republished", "redelivered"])
async def test_a_duplicate_is_answered_from_the_outcome_store_without_running(
    swarm: MemorySwarm, redelivered: bool
) -> None:
    stored_reply = encode({"id": "t", "status": "ok", "result": "first time"})
    record = swarm.store.outcome_record("t", "ok", stored_reply)
    assert record is not None
    swarm.store.apply(record)

    outcome = await outcome_of(start(swarm, delivery(task_body("t"), redelivered=redelivered)))
    assert outcome.reply_body == stored_reply
    assert outcome.status == "ok"
    # A redelivery was answered before (the reply is withheld); a republished copy is answered.
    assert outcome.reply is not redelivered
    assert not outcome.record and not outcome.dead_letter
    assert swarm.pools.calls == []


async def test_a_duplicate_arriving_while_its_original_runs_waits_for_its_reply(
    make_swarm: Callable[..., MemorySwarm],
) -> None:
    swarm = make_swarm()
    entered: list[Delivery] = []

    async def process(task: Delivery) -> Outcome:
        entered.append(task)
        swarm.changes.notify()
        return await swarm.processor.process(task)

    swarm.process_task = process
    await swarm.start()
    original = swarm.send(task_body("t"))
    call = await swarm.pools.next_call()
    duplicate = swarm.send(task_body("t"))
    await swarm.until(lambda: len(entered) == 2, "the duplicate to be processed")
    assert not duplicate.settled  # waiting for the original, not run

    call.succeed("once")
    await swarm.settled(original, duplicate)
    assert original.acked and duplicate.acked
    assert len(swarm.pools.calls) == 1
    replies = swarm.replies()
    assert [r["result"] for r in replies] == ["once", "once"]
    assert replies[0] == replies[1]
    assert len(swarm.broker.stream) == 1  # recorded once


REFUSED_BODIES = [
    pytest.param(b"\xc1", {}, "malformed", id="malformed"),
    pytest.param(
        encode({"v": 1, "id": "t", "type": "data_processing"}), {}, "invalid", id="invalid"
    ),
    pytest.param(task_body("t", type="training"), {}, "type_mismatch", id="type-mismatch"),
    pytest.param(task_body("t", handler="nobody"), {}, "unknown_handler", id="unknown-handler"),
    pytest.param(task_body("t"), {"content_type": "text/plain"}, "malformed", id="content-type"),
]


@pytest.mark.parametrize(("body", "properties", "code"), REFUSED_BODIES)
async def test_a_refused_body_is_neither_answered_from_nor_written_to_the_store(
    swarm: MemorySwarm, body: bytes, properties: dict[str, Any], code: str
) -> None:
    record = swarm.store.outcome_record("t", "ok", encode("an earlier outcome of t"))
    assert record is not None
    swarm.store.apply(record)

    outcome = await outcome_of(start(swarm, delivery(body, message_id="t", **properties)))
    assert outcome.error_code == code
    assert outcome.status == "error" and outcome.reply and outcome.dead_letter
    assert not outcome.record and not outcome.recorded
    stored = swarm.store.get("t")
    assert stored is not None and decode(stored.reply_body) == "an earlier outcome of t"


async def test_a_refused_body_is_not_recorded_so_a_corrected_body_of_its_id_runs(
    make_swarm: Callable[..., MemorySwarm],
) -> None:
    swarm = make_swarm()
    await swarm.start()
    refused = swarm.send(task_body("t", handler="nobody"))
    await swarm.settled(refused)
    assert refused.acked
    assert [(r["status"], r["error"]["code"]) for r in swarm.replies()] == [
        ("error", "unknown_handler")
    ]
    assert len(swarm.dead_letters()) == 1
    assert swarm.broker.stream == [] and swarm.store.get("t") is None

    corrected = swarm.send(task_body("t"))
    (await swarm.pools.next_call()).succeed("ran")
    await swarm.settled(corrected)
    assert swarm.replies()[-1]["result"] == "ran"
    assert len(swarm.broker.stream) == 1
