"""From a delivery to its outcome: intake, pool choice, placement, the run, and retries.

Knows nothing of AMQP: the ingress hands it a Delivery and publishes the Outcome it returns.
"""

import random
import time

import structlog

from broker.delivery import Delivery
from broker.errors import Rejection
from broker.intake import admit, is_expired
from broker.outcome import Outcome
from broker.placement import PlacementRules
from broker.pools import PoolSet
from broker.replies import encode_reply, error_reply
from broker.scheduler import Scheduler
from broker.settings import Settings
from schemas.reply import Reply, Timing
from schemas.task import TaskMessage
from workers.errors import WorkerLost
from workers.registry import HandlerRegistry
from workers.resources import ResourceVector

log = structlog.get_logger("swarm.processor")


class TaskProcessor:
    def __init__(
        self,
        settings: Settings,
        registry: HandlerRegistry,
        scheduler: Scheduler,
        pools: PoolSet,
    ) -> None:
        self._settings = settings
        self._limits = settings.codec_limits
        self._registry = registry
        self._scheduler = scheduler
        self._pools = pools
        self._rules = PlacementRules(settings)

    async def process(self, delivery: Delivery) -> Outcome:
        routing_type = delivery.task_type or "unknown"
        admitted = admit(delivery, self._limits, self._registry)
        if isinstance(admitted, Rejection):
            log.info(
                "task rejected",
                code=admitted.code,
                reason=admitted.message,
                task_id=admitted.task_id,
                queue=delivery.queue,
            )
            return self._answer(admitted, routing_type)
        task = admitted
        structlog.contextvars.bind_contextvars(task_id=task.id)
        try:
            if is_expired(task):
                return self._expired(task, attempts=0, queued_ms=_ms_since(delivery))
            placement = self._rules.place(task, self._pools.running, self._scheduler.ledger)
            if isinstance(placement, Rejection):
                return self._answer(placement, task.type, task.id)
            return await self._run(delivery, task, placement.pool, placement.request)
        finally:
            structlog.contextvars.unbind_contextvars("task_id")

    async def _run(
        self, delivery: Delivery, task: TaskMessage, pool: str, request: ResourceVector
    ) -> Outcome:
        max_retries = (
            self._settings.default_max_retries if task.max_retries is None else task.max_retries
        )
        attempts = 0
        ran_ms = 0.0
        while True:
            actor = await self._scheduler.acquire(pool, request, task.priority or 0, delivery.queue)
            try:
                if is_expired(task):
                    return self._expired(task, attempts, _ms_since(delivery) - ran_ms)
                attempts += 1
                started = time.monotonic()
                result = await self._pools.run(
                    actor, task.handler, task.type, task.args, task.timeout_s
                )
            except WorkerLost as lost:
                ran_ms += (time.monotonic() - started) * 1000.0
                self._pools.actor_lost(actor)
                if attempts > max_retries:
                    return self._answer(
                        Rejection(
                            "worker_lost",
                            f"{lost}; gave up after {attempts} attempts",
                            task.id,
                            retryable=True,
                        ),
                        task.type,
                        task.id,
                        attempts=attempts,
                        pool=pool,
                        node=actor.node_id,
                    )
                log.warning("worker lost; retrying on another actor", attempt=attempts)
                await self._backoff(attempts)
                continue
            finally:
                self._scheduler.release(pool, actor, request)
            queued_ms = max(0.0, _ms_since(delivery) - ran_ms - result.run_ms)
            if result.ok:
                reply = Reply(
                    id=task.id,
                    status="ok",
                    attempts=attempts,
                    pool=pool,
                    node=actor.node_id,
                    timing=Timing(queued_ms=queued_ms, run_ms=result.run_ms),
                )
                return Outcome(
                    task.id, "ok", encode_reply(reply, result.payload), task.type, attempts=attempts
                )
            code = result.error_code or "handler_error"
            return self._answer(
                Rejection(code, result.error_message or code, task.id),
                task.type,
                task.id,
                attempts=attempts,
                pool=pool,
                node=actor.node_id,
                queued_ms=queued_ms,
                run_ms=result.run_ms,
            )

    async def _backoff(self, attempt: int) -> None:
        """Exponential backoff with full jitter, so retries of a crashed batch spread out."""
        import asyncio

        ceiling = self._settings.retry_backoff_s * (2 ** (attempt - 1))
        await asyncio.sleep(random.uniform(0, ceiling))

    def _expired(self, task: TaskMessage, attempts: int, queued_ms: float) -> Outcome:
        reply = error_reply(
            task.id,
            "expired",
            "expired",
            f"deadline {task.deadline} passed before the task started",
            attempts=attempts,
            queued_ms=max(0.0, queued_ms),
        )
        return Outcome(
            task.id,
            "expired",
            encode_reply(reply),
            task.type,
            "expired",
            reply.error.message if reply.error else None,
            attempts,
        )

    def _answer(
        self,
        rejection: Rejection,
        routing_type: str,
        task_id: str | None = None,
        *,
        attempts: int = 0,
        pool: str | None = None,
        node: str | None = None,
        queued_ms: float = 0.0,
        run_ms: float = 0.0,
    ) -> Outcome:
        task_id = task_id or rejection.task_id
        reply = error_reply(
            task_id,
            "error",
            rejection.code,
            rejection.message,
            retryable=rejection.retryable,
            attempts=attempts,
            pool=pool,
            node=node,
            queued_ms=queued_ms,
            run_ms=run_ms,
        )
        return Outcome(
            task_id,
            "error",
            encode_reply(reply),
            routing_type,
            rejection.code,
            rejection.message,
            attempts,
        )


def _ms_since(delivery: Delivery) -> float:
    return (time.monotonic() - delivery.received_at_s) * 1000.0
