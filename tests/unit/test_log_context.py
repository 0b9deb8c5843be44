"""Log lines about a delivery carry its queue and task id from structlog's context (bound by
the ingress and the processor, not passed by each call), and an expected error is one line
without a traceback, the traceback at debug. The real Ingress and TaskProcessor on RabbitMQ in
memory (tests/unit/fakes), no Ray."""

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import structlog
from fakes.server import nack
from fakes.swarm import REPLY_QUEUE, MemorySwarm, task_body
from structlog.testing import LogCapture
from structlog.typing import EventDict

from broker.tasks.delivery import Delivery
from broker.tasks.outcome import Outcome
from schemas.topology import task_queue

QUEUE = task_queue("data_processing")


@pytest.fixture
def logs() -> Iterator[list[EventDict]]:
    """Every event logged during the test, with the context merged in as the daemon's
    configuration does (broker/logging.py)."""
    capture = LogCapture()
    processors = structlog.get_config()["processors"]
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        yield capture.entries
    finally:
        structlog.configure(processors=processors)


@pytest.fixture
async def swarm(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MemorySwarm]:
    started = MemorySwarm(monkeypatch)
    await started.start()
    yield started
    await started.close()


def _one(logs: list[EventDict], event: str) -> EventDict:
    [entry] = [entry for entry in logs if entry["event"] == event]
    return entry


async def test_a_rejected_task_is_logged_with_the_queue_it_came_from(
    swarm: MemorySwarm, logs: list[EventDict]
) -> None:
    message = swarm.send(task_body("r1", handler="no_such_handler"))
    await swarm.settled(message)

    entry = _one(logs, "task_rejected")
    assert entry["queue"] == QUEUE
    assert entry["task_id"] == "r1"  # the id it claims, passed: a rejected body is no task
    assert structlog.contextvars.get_contextvars() == {}  # nothing leaks out of a delivery


async def test_lines_inside_a_run_carry_the_task_id_and_queue_from_the_context(
    swarm: MemorySwarm, logs: list[EventDict]
) -> None:
    message = swarm.send(task_body("t1"))
    (await swarm.pools.next_call()).fail(message="busy", retry_delay_s=0.0)
    (await swarm.pools.next_call()).lose()
    (await swarm.pools.next_call()).succeed("done")
    await swarm.settled(message)

    retrying = _one(logs, "task_retrying")
    assert (retrying["task_id"], retrying["queue"], retrying["reason"]) == ("t1", QUEUE, "busy")
    lost = _one(logs, "worker_lost_retrying")
    assert (lost["task_id"], lost["queue"], lost["log_level"]) == ("t1", QUEUE, "warning")
    assert "exc_info" not in lost  # one line, no traceback ...
    traceback = _one(logs, "worker_lost_traceback")
    assert traceback["log_level"] == "debug" and traceback["exc_info"]  # ... which is at debug
    assert traceback["task_id"] == "t1"


async def test_publishing_lines_carry_the_task_id_bound_by_the_ingress(
    swarm: MemorySwarm, logs: list[EventDict]
) -> None:
    swarm.broker.on_publish(nack, routing_key=REPLY_QUEUE, times=1)
    message = swarm.send(task_body("p1"))
    (await swarm.pools.next_call()).succeed("done")
    await swarm.settled(message)

    # Refused once, taken when sent again: both lines name the task.
    entry = _one(logs, "reply_taken_on_resend")
    assert (entry["task_id"], entry["queue"]) == ("p1", QUEUE)


async def test_an_unexpected_processing_error_is_one_error_line_with_its_traceback(
    swarm: MemorySwarm, logs: list[EventDict]
) -> None:
    async def broken(delivery: Delivery) -> Outcome:
        raise RuntimeError("a bug in processing")

    swarm.process_task = broken
    message = swarm.send(task_body("b1"))
    await swarm.settled(message)

    entry: dict[str, Any] = _one(logs, "delivery_failed")
    assert entry["log_level"] == "error" and entry["exc_info"] is True
    assert entry["queue"] == QUEUE and "task_id" not in entry  # no outcome named one
