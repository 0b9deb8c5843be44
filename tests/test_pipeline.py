"""The contract end to end on real RabbitMQ and Ray, driven by a raw aio-pika producer."""

import msgpack
import pytest
import structlog
from conftest import DaemonFactory
from raw import RawProducer, task
from structlog.testing import LogCapture

from broker.daemon import Daemon
from schemas.topology import TRACEBACK_HEADER


@pytest.mark.parametrize("task_type", ["training", "inference", "data_processing"])
async def test_each_task_type_round_trips(
    daemon: Daemon, producer: RawProducer, task_type: str
) -> None:
    inbox = await producer.inbox()
    results = await producer.watch_results()
    body = task(task_type, "echo", {"x": 1, "blob": b"\x00\x01", "list": [1.5, None, True]})
    correlation_id = await producer.publish(task_type, body, reply_to=inbox.name)

    reply = await inbox.one()
    payload = reply.payload
    assert payload["status"] == "ok"
    assert payload["id"] == body["id"]
    assert payload["result"] == body["args"]
    assert payload["error"] is None
    assert payload["attempts"] == 1
    assert payload["pool"] == "cpu"
    assert payload["node"] in {node.node_id for node in daemon.scheduler.ledger.alive_nodes()}
    assert set(payload["timing"]) == {"queued_ms", "run_ms"}
    assert payload["v"] == 1
    assert reply.message.correlation_id == correlation_id
    assert reply.message.content_type == "application/msgpack"
    assert reply.headers["x-swarm-status"] == "ok"

    copy = await results.one()
    assert copy.message.routing_key == f"{task_type}.ok"
    assert copy.body == reply.body


async def test_reply_keys_are_exactly_the_contract(daemon: Daemon, producer: RawProducer) -> None:
    inbox = await producer.inbox()
    await producer.publish("inference", task(args=[1, 2]), reply_to=inbox.name)
    payload = (await inbox.one()).payload
    assert set(payload) == {
        "v",
        "id",
        "status",
        "result",
        "error",
        "attempts",
        "pool",
        "node",
        "timing",
    }


async def test_default_exchange_reaches_the_same_queue(
    daemon: Daemon, producer: RawProducer
) -> None:
    inbox = await producer.inbox()
    await producer.publish(
        "training", task("training", args="hi"), reply_to=inbox.name, via_queue=True
    )
    assert (await inbox.one()).payload["result"] == "hi"


async def test_without_reply_to_the_reply_goes_to_results_only(
    daemon: Daemon, producer: RawProducer
) -> None:
    results = await producer.watch_results("data_processing.*")
    body = task("data_processing", args={"n": 3})
    await producer.publish("data_processing", body)
    copy = await results.one()
    assert copy.payload["id"] == body["id"]
    assert copy.payload["result"] == {"n": 3}


async def test_correlation_id_defaults_to_task_id(daemon: Daemon, producer: RawProducer) -> None:
    inbox = await producer.inbox()
    body = task()
    await producer.publish("inference", body, reply_to=inbox.name, correlation_id=None)
    reply = await inbox.one()
    assert reply.message.correlation_id == body["id"]


async def test_sleep_returns_its_args_after_waiting(daemon: Daemon, producer: RawProducer) -> None:
    inbox = await producer.inbox()
    await producer.publish(
        "training", task("training", "sleep", {"seconds": 0.2}), reply_to=inbox.name
    )
    payload = (await inbox.one()).payload
    assert payload["status"] == "ok"
    assert payload["result"] == {"seconds": 0.2}
    assert payload["timing"]["run_ms"] >= 200


async def test_handler_error_is_final_not_retried(daemon: Daemon, producer: RawProducer) -> None:
    inbox = await producer.inbox()
    dead = await producer.watch_dead()
    body = task("inference", "fail", {"message": "boom"}, max_retries=5)
    await producer.publish("inference", body, reply_to=inbox.name)
    payload = (await inbox.one()).payload
    assert payload["status"] == "error"
    assert payload["error"] == {
        "code": "handler_error",
        "message": "HandlerFailure: boom",
        "retryable": False,
    }
    assert payload["attempts"] == 1
    letter = await dead.one()
    assert letter.headers["x-swarm-error-code"] == "handler_error"
    assert letter.headers["x-swarm-attempts"] == 1
    assert msgpack.unpackb(letter.body) == body


async def test_a_handler_that_raises_logs_one_line_and_dead_letters_its_traceback(
    daemon: Daemon, producer: RawProducer
) -> None:
    inbox = await producer.inbox()
    dead = await producer.watch_dead()
    body = task("inference", "fail", {"message": "boom"}, id="traceback-1")
    capture = LogCapture()
    processors = structlog.get_config()["processors"]
    # As the daemon's configuration merges them (broker/logging.py): the task id is bound.
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        await producer.publish("inference", body, reply_to=inbox.name)
        payload = (await inbox.one()).payload
        letter = await dead.one()
    finally:
        structlog.configure(processors=processors)
    assert payload["error"]["message"] == "HandlerFailure: boom"  # the reply stays short
    trace = letter.headers[TRACEBACK_HEADER]
    assert trace.startswith("Traceback (most recent call last):")
    assert 'workers/builtin.py", line' in trace and trace.endswith("HandlerFailure: boom")
    [line] = [entry for entry in capture.entries if entry["event"] == "handler_failed"]
    assert line["log_level"] == "error"
    assert (line["task_id"], line["handler"], line["attempt"]) == ("traceback-1", "fail", 1)
    assert line["traceback"] == trace


async def test_tasks_run_concurrently_on_one_actor(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    """Twenty zero-cpu tasks meet at a barrier inside one actor: only possible if they run at
    the same time."""
    await start_daemon(handler_modules=["workers.diagnostics"], cpu_pool_min=1, cpu_pool_max=1)
    inbox = await producer.inbox()
    for _ in range(20):
        await producer.publish(
            "inference",
            task("inference", "barrier", {"name": "b", "parties": 20}, resources={"cpus": 0}),
            reply_to=inbox.name,
        )
    replies = await inbox.wait_for(20)
    assert [r.payload["status"] for r in replies] == ["ok"] * 20


async def test_batch_handler_answers_queued_tasks_with_one_call(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    await start_daemon(handler_modules=["workers.diagnostics"], cpu_pool_min=1, cpu_pool_max=1)
    inbox = await producer.inbox()
    bodies = [task("inference", "batch_echo", n, resources={"cpus": 0}) for n in range(40)]
    for body in bodies:
        await producer.publish("inference", body, reply_to=inbox.name)
    replies = {r.payload["id"]: r.payload for r in await inbox.wait_for(40)}
    # Each task gets its own result, whatever batch it ran in.
    assert [replies[b["id"]]["result"]["item"] for b in bodies] == list(range(40))
    sizes = [reply["result"]["batch"] for reply in replies.values()]
    assert max(sizes) > 1  # batched ...
    assert max(sizes) <= 16  # ... never past batch_max
