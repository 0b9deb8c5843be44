"""Progress that a handler reports faster than it can leave is bounded: in the actor (the
oldest pending reports dropped, counted) and in the ingress (per task one message in flight
and a few waiting, the oldest of them dropped past that); a short burst loses nothing."""

import asyncio
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from processor_harness import delivery as make_delivery
from processor_harness import make_harness

from broker.amqp.ingress import Ingress
from broker.amqp.outcomes import OutcomeStore
from broker.amqp.progress import PROGRESS_WAITING
from broker.tasks.outcome import Outcome, succeeded
from schemas.codec import decode, encode
from workers.outcome import RunOutcome

REPORTS = 5_000


@pytest.fixture
def chatty_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = "swarm_test_chatty_handlers"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from workers.registry import handler

            @handler("chatty")
            def chatty(args, ctx):
                for n in range(args["reports"]):
                    ctx.progress(n)
                return "done"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import ray

    # What WorkerActor reads of Ray's runtime context, without a Ray.
    context = SimpleNamespace(get_node_id=lambda: "node-1", get_accelerator_ids=lambda: {})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    yield name
    sys.modules.pop(name, None)


async def test_the_actor_keeps_a_bounded_backlog_of_reports_and_counts_what_it_dropped(
    chatty_module: str,
) -> None:
    from workers.actor import WorkerActor

    actor = WorkerActor("cpu", [chatty_module])
    stream = actor.run_streaming("chatty", "inference", {"reports": REPORTS}, None, "t", 1)
    first = await stream.__anext__()  # the run started; nobody reads for a while
    await asyncio.sleep(0.5)  # the handler's thread reports everything meanwhile
    rest = [item async for item in stream]
    final = rest.pop()
    assert isinstance(final, RunOutcome) and final.ok
    reports = [first, *rest]
    assert len(reports) <= 64 + 1, f"{len(reports)} reports were kept waiting in the actor"
    delivered = len(reports) + sum(item[2] for item in reports)
    assert delivered == REPORTS, "each dropped report is counted"


class SlowPublisher:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.go = asyncio.Event()

    async def publish_progress(self, delivery: Any, body: bytes) -> None:
        await self.go.wait()
        self.sent.append(body)


async def test_the_ingress_sends_one_progress_message_at_a_time_per_task() -> None:
    async def process(_: Any) -> Any:
        raise AssertionError("nothing is delivered")

    ingress = Ingress(
        "amqp://unused/", 1, process, process, OutcomeStore(retention_s=60), lambda _: None
    )
    publisher = SlowPublisher()
    ingress._session = SimpleNamespace(  # type: ignore[assignment]
        lost=asyncio.Event(), publisher=publisher
    )
    running = make_delivery("p-1")
    for n in range(REPORTS):
        ingress.publish_progress(running, n.to_bytes(2, "big"))
    await asyncio.sleep(0)
    assert len(ingress._progress_sends) == 1, "one send task per progress message"
    publisher.go.set()
    while ingress._progress_sends:
        await asyncio.wait(set(ingress._progress_sends.values()))
    # The latest reports are sent, in order; the oldest of those waiting were dropped.
    numbers = [int.from_bytes(body, "big") for body in publisher.sent]
    assert len(numbers) <= PROGRESS_WAITING + 1 and numbers == sorted(numbers)
    assert numbers[-1] == REPORTS - 1
    assert ingress.progress_superseded + len(publisher.sent) == REPORTS
    # A later report of the same task starts a new send.
    ingress.publish_progress(running, b"again")
    while ingress._progress_sends:
        await asyncio.wait(set(ingress._progress_sends.values()))
    assert publisher.sent[-1] == b"again"


async def test_seq_counts_the_reports_the_actor_dropped() -> None:
    harness = make_harness()
    sent: list[bytes] = []
    harness.processor.publish_progress = lambda delivery, body: sent.append(body)
    report = harness.processor._progress_reporter(make_delivery("p-2"), "p-2", 1)
    report(encode(1), 0)
    report(encode(5), 3)  # three reports dropped in the actor before this one
    report(encode(6))
    assert [decode(body)["seq"] for body in sent] == [1, 5, 6]


async def test_a_short_burst_of_progress_is_sent_whole_and_in_order() -> None:
    async def process(_: Any) -> Any:
        raise AssertionError("nothing is delivered")

    ingress = Ingress(
        "amqp://unused/", 1, process, process, OutcomeStore(retention_s=60), lambda _: None
    )
    publisher = SlowPublisher()
    publisher.go.set()
    ingress._session = SimpleNamespace(  # type: ignore[assignment]
        lost=asyncio.Event(), publisher=publisher
    )
    running = make_delivery("p-3")
    for n in range(5):
        ingress.publish_progress(running, bytes([n]))
    while ingress._progress_sends:
        await asyncio.wait(set(ingress._progress_sends.values()))
    assert publisher.sent == [bytes([n]) for n in range(5)]
    assert ingress.progress_superseded == 0


async def test_the_reply_goes_after_the_tasks_waiting_progress() -> None:
    order: list[object] = []
    publisher = SlowPublisher()
    publisher.sent = order  # type: ignore[assignment]
    running = make_delivery("p-4")

    async def process(delivery: Any) -> Outcome:
        for n in range(3):
            ingress.publish_progress(delivery, bytes([n]))
        return succeeded("p-4", "inference", None, attempts=1, pool="cpu", node="n", queued_ms=0,
                         run_ms=0)  # fmt: skip

    ingress = Ingress(
        "amqp://unused/", 1, process, process, OutcomeStore(retention_s=60), lambda _: None
    )
    ingress._session = SimpleNamespace(  # type: ignore[assignment]
        lost=asyncio.Event(), publisher=publisher
    )

    async def publish(*_: object) -> None:
        order.append("reply")

    ingress._publish = publish  # type: ignore[method-assign]
    handling = asyncio.create_task(ingress._handle(running, process))
    await asyncio.sleep(0.01)
    assert order == [], "the reply left before the progress messages"
    publisher.go.set()
    await handling
    assert order == [bytes([0]), bytes([1]), bytes([2]), "reply"]
