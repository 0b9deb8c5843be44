"""A TaskProcessor on small fakes, no RabbitMQ and no Ray: the real scheduler, ledger, outcome
store and settlement state machine; pools whose runs the test releases; settlements that record
what RabbitMQ would have been told. `answer` plays the ingress: record, settle, ack."""

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from broker.amqp.outcomes import OutcomeStore
from broker.scheduling.ledger import Ledger
from broker.scheduling.scheduler import Scheduler
from broker.settings import Settings
from broker.tasks.delivery import Delivery
from broker.tasks.outcome import Outcome
from broker.tasks.processor import TaskProcessor
from broker.tasks.settlement import Settlement
from schemas.codec import encode
from schemas.topology import CONTENT_TYPE, task_queue
from workers.cluster import NodeInfo
from workers.outcome import RunOutcome
from workers.pool import ActorInfo, PoolSpec
from workers.registry import load_handlers
from workers.resources import ResourceVector
from workers.results import encode_result

CPU_SHAPE = ResourceVector(cpus=4.0)


class RecordingSettlement(Settlement):
    """What RabbitMQ is told about one delivery, in order ("ack", "requeue")."""

    __slots__ = ("fail_ack", "sent")

    def __init__(self, fail_ack: BaseException | None = None) -> None:
        super().__init__()
        self.sent: list[str] = []
        self.fail_ack = fail_ack

    async def _send_ack(self) -> None:
        self.sent.append("ack")
        if self.fail_ack is not None:
            raise self.fail_ack

    async def _send_requeue(self) -> None:
        self.sent.append("requeue")


@dataclass
class ScriptedPools:
    """Stands in for broker.scheduling.pools.PoolSet: every run waits until the test releases it."""

    running: dict[str, PoolSpec] = field(
        default_factory=lambda: {"cpu": PoolSpec("cpu", 1, 1, CPU_SHAPE)}
    )
    release: asyncio.Event = field(default_factory=asyncio.Event)
    capacity: Ledger = field(default_factory=Ledger)  # what placement asks: the nodes present
    started: list[str] = field(default_factory=list)
    in_progress: Counter[str] = field(default_factory=Counter)
    most_at_once: Counter[str] = field(default_factory=Counter)
    run_started: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self, actor: ActorInfo, handler: str, task_type: str, args: Any,
                  timeout_s: float | None, *, task_id: str = "", attempt: int = 1,
                  coalesce: bool = False) -> RunOutcome:  # fmt: skip
        self.started.append(task_id)
        self.in_progress[task_id] += 1
        self.most_at_once[task_id] = max(self.most_at_once[task_id], self.in_progress[task_id])
        async with self.run_started:
            self.run_started.notify_all()
        try:
            await self.release.wait()
        finally:
            self.in_progress[task_id] -= 1
        return RunOutcome(ok=True, payload=encode_result(args), run_ms=1.0)

    async def runs_started(self, count: int) -> None:
        async with self.run_started:
            await self.run_started.wait_for(lambda: len(self.started) >= count)

    def actor_lost(self, actor: ActorInfo) -> None:
        pass

    def reap(self) -> None:
        pass

    def retire(self, actor: ActorInfo) -> None:
        pass


@dataclass
class Harness:
    processor: TaskProcessor
    pools: ScriptedPools
    store: OutcomeStore
    scheduler: Scheduler
    renewals: list[str] = field(default_factory=list)

    async def answer(self, delivery: Delivery, outcome: Outcome, *, stored: bool = True) -> None:
        """What the ingress does once `outcome` is back: its record applied (unless the
        publish failed: `stored=False`), the processor told, the delivery settled."""
        token = delivery.settle_token
        assert token is not None
        if stored and outcome.recorded:
            assert outcome.task_id is not None
            record = self.store.outcome_record(outcome.task_id, outcome.status, outcome.reply_body)
            assert record is not None
            self.store.apply(record)
        self.processor.settled(outcome)
        if not outcome.settle:
            return
        await (token.ack() if stored else token.requeue())


def make_harness(**settings: Any) -> Harness:
    config = Settings(**{"lease_renew_s": 3600.0, "metrics_port": -1, **settings})
    ledger = Ledger()
    ledger.set_nodes([NodeInfo("n1", True, "10.0.0.1", ResourceVector(8.0, 0.0, 16384))])
    ledger.add_actor(ActorInfo("cpu-0", "cpu", "n1", CPU_SHAPE, 64))
    scheduler = Scheduler(ledger)
    pools = ScriptedPools(capacity=ledger)
    store = OutcomeStore(retention_s=3600)
    processor = TaskProcessor(
        config,
        load_handlers([]),
        scheduler,
        pools,  # type: ignore[arg-type]
        store,
    )
    harness = Harness(processor, pools, store, scheduler)

    async def renew(delivery: Delivery, lease: str) -> None:
        harness.renewals.append(lease)

    processor.renew = renew
    return harness


def delivery(
    task_id: str,
    *,
    redelivered: bool = False,
    headers: dict[str, Any] | None = None,
    settlement: Settlement | None = None,
    handler: str = "sleep",
    **fields: Any,
) -> Delivery:
    body = {"v": 1, "id": task_id, "type": "inference", "handler": handler, "args": {}, **fields}
    return Delivery(
        body=encode(body),
        queue=task_queue("inference"),
        task_type="inference",
        properties={
            "content_type": CONTENT_TYPE,
            "headers": headers,
            "reply_to": "replies",
            "correlation_id": f"c-{task_id}",
        },
        redelivered=redelivered,
        received_at_s=time.monotonic(),
        settle_token=settlement if settlement is not None else RecordingSettlement(),
    )


async def until(condition: Any, timeout_s: float = 5.0) -> None:
    """Let the loop run until `condition()` holds (a few iterations, in practice)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)
