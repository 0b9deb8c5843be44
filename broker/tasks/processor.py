"""From a delivery to its outcome: intake, duplicates, placement, the run, retries, cancels.

Knows nothing of AMQP: the ingress hands it a Delivery, publishes the Outcome it returns, and
calls `settled` once that is done.
"""

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable

import structlog

from broker.amqp.outcomes import OutcomeStore
from broker.errors import DeadlinePassed, Rejection, ScaleUpTimedOut
from broker.ops import tracing
from broker.ops.tracing import TRACEPARENT_HEADER, TRACESTATE_HEADER
from broker.scheduling.placement import PlacementRules
from broker.scheduling.pools import PoolSet
from broker.scheduling.scheduler import Scheduler
from broker.settings import Settings
from broker.tasks import lease_keeper
from broker.tasks.active import ActiveTask, ActiveTasks
from broker.tasks.delivery import LEASE_HEADER, Delivery, Settlement
from broker.tasks.intake import admit, is_expired
from broker.tasks.leases import LeaseSeal
from broker.tasks.outcome import Outcome, duplicate, held_copy, refused, rejected, succeeded
from schemas.codec import decode, encode
from schemas.progress import ProgressMessage
from schemas.task import TaskMessage
from schemas.topology import REPLAY_HEADER
from workers.errors import WorkerLost
from workers.pool import ActorInfo
from workers.registry import HandlerRegistry, HandlerSpec
from workers.resources import ResourceVector

log = structlog.get_logger("swarm.processor")


class TaskProcessor:
    def __init__(
        self,
        settings: Settings,
        registry: HandlerRegistry,
        scheduler: Scheduler,
        pools: PoolSet,
        store: OutcomeStore,
    ) -> None:
        self._settings = settings
        self._limits = settings.codec_limits
        self._registry = registry
        self._scheduler = scheduler
        self._pools = pools
        self._store = store
        self._rules = PlacementRules(settings)
        self._max_reply_bytes = settings.max_reply_mb * 1024 * 1024
        self.active = ActiveTasks()
        self._settling: set[asyncio.Future[None]] = set()
        self.leases = LeaseSeal(
            settings.lease_secret.get_secret_value().encode() if settings.lease_secret else None
        )
        # Puts a renewal copy of the delivery on its queue, with this `x-swarm-lease` value.
        self.renew: Callable[[Delivery, str], Awaitable[None]] = _cannot_renew
        # Best effort, never awaited: a progress message must not hold up the task.
        self.publish_progress: Callable[[Delivery, bytes], None] = lambda delivery, body: None

    async def process(self, delivery: Delivery) -> Outcome:
        headers = delivery.properties.get("headers")
        if headers and LEASE_HEADER in headers:
            lease, carried = self.leases.verified(delivery)
            delivery = dataclasses.replace(delivery, lease=lease, carried_deliveries=carried)
        trace = (
            tracing.parse(headers.get(TRACEPARENT_HEADER), headers.get(TRACESTATE_HEADER))
            if headers
            else None
        )
        if trace is None:
            return await self._process(delivery)
        span = trace.child()
        structlog.contextvars.bind_contextvars(trace_id=span.trace_id, span_id=span.span_id)
        try:
            outcome = await self._process(delivery)
        finally:
            structlog.contextvars.unbind_contextvars("trace_id", "span_id")
        return dataclasses.replace(outcome, trace_headers=span.headers())

    async def _process(self, delivery: Delivery) -> Outcome:
        routing_type = delivery.task_type or "unknown"
        admitted = admit(delivery, self._limits, self._registry)
        if isinstance(admitted, Rejection):
            # Refused before it was accepted as a task: the id it carries (or its message_id)
            # neither reads nor writes the outcome store, so a stored outcome never answers a
            # body that is not that task, and a corrected body of the same id still runs.
            log.info(
                "task_rejected",
                code=admitted.code,
                reason=admitted.message,
                task_id=admitted.task_id,  # the id it claims: not bound, it is no task yet
            )
            return refused(admitted, routing_type)
        task = admitted
        earlier = await self._earlier_outcome(task.id, routing_type, delivery)
        if earlier is not None:
            return earlier
        if self._store.cancel_pending(task.id):
            return rejected(
                Rejection("cancelled", "cancelled before it arrived", task.id),
                task.type,
                status="cancelled",
            )
        structlog.contextvars.bind_contextvars(task_id=task.id)
        # No await since _earlier_outcome found no entry for the id: this run is its only one.
        active = self.active.begin(task.id)
        try:
            outcome = await self._admitted(delivery, task, active)
        except BaseException:
            self.active.end(active)  # no outcome: nothing will be settled for it
            raise
        finally:
            active.worker = None  # decided: a cancel from now on finds it finishing
            structlog.contextvars.unbind_contextvars("task_id")
        return dataclasses.replace(outcome, active=active)

    def settled(self, outcome: Outcome) -> None:
        """The outcome was published and recorded (or that failed): duplicates may go on."""
        active = outcome.active
        if active is None:
            return
        self.active.end(active)
        if active.copies or active.renewed_copies:
            self._settle_copies(active.task_id, active.copies + active.renewed_copies)

    def _settle_copies(self, task_id: str, copies: list[Settlement]) -> None:
        """The renewal copies of a task that ended here: acknowledged once its outcome is
        stored; handed back to the queue when it is not (its publish failed), since a copy
        may be the task's only message by then."""
        stored = self._store.get(task_id) is not None

        async def settle() -> None:
            for copy in copies:
                try:
                    await (copy.ack() if stored else copy.requeue())
                except Exception as exc:  # one copy's failure leaves the others to settle
                    log.error(
                        "copy_settle_failed", task_id=task_id, error=f"{type(exc).__name__}: {exc}"
                    )
                    log.debug("copy_settle_failed_traceback", exc_info=True)

        task = asyncio.ensure_future(settle())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _earlier_outcome(
        self, task_id: str, routing_type: str, delivery: Delivery
    ) -> Outcome | None:
        """The stored reply when this id already has a final outcome (waiting for it when the
        same id is in progress here), else None: then no run of the id is in progress here
        either, and the caller begins one before its next await."""
        # A loop, not one wait: several deliveries of the id may wait on the same run, and
        # when it ends without a stored outcome only the first of them to wake may run it;
        # the others find that one's entry and wait again.
        while (active := self.active.get(task_id)) is not None:
            token = delivery.settle_token
            if (delivery.lease or delivery.redelivered) and token is not None:
                # Our own renewal copy, or this task's message redelivered while it runs here
                # (the channel it came on closed): held, not awaited here, so its body is let
                # go and it cannot outstay RabbitMQ's consumer timeout; acked at the next
                # renewal, or settled with the task.
                token.hold()
                active.copies.append(token)
                return held_copy(task_id, routing_type)
            await asyncio.shield(active.settled)
        stored = self._store.get(task_id)
        if stored is None:
            return None
        if stored.status == "error" and _replayed(delivery):
            # `swarm dead replay` sent it again, after its handler was fixed: it runs, and
            # its new outcome replaces the stored error. A stored `ok` is never run again.
            log.info("replay_runs_again", task_id=task_id)
            return None
        log.info(
            "duplicate_answered_from_store",
            task_id=task_id,  # not bound yet: bound for a run, and this is none
            redelivered=delivery.redelivered,
        )
        return duplicate(
            task_id,
            stored.status,
            stored.reply_body,
            routing_type,
            redelivered=delivery.redelivered or delivery.lease > 0,
        )

    async def _admitted(self, delivery: Delivery, task: TaskMessage, active: ActiveTask) -> Outcome:
        if is_expired(task):
            return self._expired(task, 0, _ms_since(delivery))
        earlier = delivery.earlier_deliveries
        if earlier >= self._settings.max_deliveries:
            # Delivered this often without reaching an outcome (its runs, or the publishing
            # of their outcome, never completed: a daemon killed by it, a reply RabbitMQ
            # refuses): answered and dead-lettered, not run again and again.
            log.warning(
                "redelivery_limit_reached",
                deliveries=earlier + 1,
                max_deliveries=self._settings.max_deliveries,
            )
            return rejected(
                Rejection(
                    "redelivery_limit",
                    f"delivered {earlier + 1} times without reaching an outcome "
                    f"(SWARM_MAX_DELIVERIES is {self._settings.max_deliveries}); not run again",
                    task.id,
                ),
                task.type,
                queued_ms=_ms_since(delivery),
            )
        placement = self._rules.place(task, self._pools.running, self._pools.capacity)
        if isinstance(placement, Rejection):
            return rejected(placement, task.type, task.id)
        # A timer, not a task: most tasks end long before their first renewal, and a timer is
        # far cheaper to create and cancel on the per-task path.
        keeper: list[asyncio.Task[None]] = []
        timer = asyncio.get_running_loop().call_later(
            self._settings.lease_renew_s,
            lambda: keeper.append(self._start_keeper(delivery, active)),
        )
        request = placement.request
        spec = self._registry.get(task.handler)
        assert spec is not None  # admit() answered unknown handlers
        if spec.batch_max is not None:
            # Up to batch_max runs of a batch handler are one call on the actor: together they
            # use what one run asks, so the ledger admits a full batch to one actor.
            request = request.shared_by(spec.batch_max)
        try:
            return await self._run(delivery, task, spec, placement.pool, request, active)
        except asyncio.CancelledError:
            if not active.cancel_requested:
                raise  # shutting down: the ingress hands the task back to RabbitMQ
            current = asyncio.current_task()
            if current is not None and hasattr(current, "uncancel"):
                current.uncancel()
            return rejected(
                Rejection("cancelled", "cancelled by a control request", task.id),
                task.type,
                status="cancelled",
                attempts=active.attempts,
                queued_ms=_ms_since(delivery),
            )
        finally:
            timer.cancel()
            for keeping in keeper:
                keeping.cancel()

    def _start_keeper(self, delivery: Delivery, active: ActiveTask) -> "asyncio.Task[None]":
        return lease_keeper.start(self._keep_lease(delivery, active), active.task_id)

    async def _keep_lease(self, delivery: Delivery, active: ActiveTask) -> None:
        # Through a lambda: the daemon sets `renew` once the ingress exists, after this.
        await lease_keeper.keep_lease(
            delivery,
            active,
            lambda copy_of, value: self.renew(copy_of, value),
            self.leases,
            self._settings.lease_renew_s,
        )

    async def _run(
        self,
        delivery: Delivery,
        task: TaskMessage,
        spec: HandlerSpec,
        pool: str,
        request: ResourceVector,
        active: ActiveTask,
    ) -> Outcome:
        max_retries = (
            self._settings.default_max_retries if task.max_retries is None else task.max_retries
        )
        ran_ms = 0.0
        # Streamed only when someone listens and the handler can speak: a stream is a Ray call
        # of its own, which would also take a batch handler's runs out of their shared call.
        streaming = spec.can_report_progress and delivery.wants_progress
        while True:
            try:
                actor = await self._scheduler.acquire(
                    pool,
                    request,
                    task.priority or 0,
                    delivery.queue,
                    deadline_s=task.deadline,
                    # Waiting-age metric: a task not started yet (a retry has run).
                    origin=None if active.attempts else delivery,
                )
            except DeadlinePassed:
                return self._expired(task, active.attempts, _ms_since(delivery) - ran_ms)
            except ScaleUpTimedOut as exc:
                return rejected(
                    Rejection("unsatisfiable", str(exc), task.id),
                    task.type,
                    attempts=active.attempts,
                    queued_ms=_ms_since(delivery) - ran_ms,
                )
            started = time.monotonic()
            lost: WorkerLost | None = None
            try:
                if is_expired(task):
                    return self._expired(task, active.attempts, _ms_since(delivery) - ran_ms)
                active.attempts += 1
                active.running = True
                if streaming:
                    result = await self._pools.run_streaming(
                        actor,
                        task.handler,
                        task.type,
                        task.args,
                        task.timeout_s,
                        task.id,
                        active.attempts,
                        self._progress_reporter(delivery, task.id, active.attempts),
                    )
                else:
                    result = await self._pools.run(
                        actor,
                        task.handler,
                        task.type,
                        task.args,
                        task.timeout_s,
                        task_id=task.id,
                        attempt=active.attempts,
                        coalesce=spec.shares_calls,
                    )
            except WorkerLost as error:
                lost = error
                ran_ms += (time.monotonic() - started) * 1000.0
                self._pools.actor_lost(actor)
            except asyncio.CancelledError:
                self._retire_if_stuck(spec, actor)
                raise
            finally:
                active.running = False
                self._scheduler.release(pool, actor, request)
                self._pools.reap()
            if lost is not None:
                if active.attempts > max_retries:
                    return rejected(
                        Rejection(
                            "worker_lost",
                            f"{lost}; gave up after {active.attempts} attempts",
                            task.id,
                            retryable=True,
                        ),
                        task.type,
                        attempts=active.attempts,
                        pool=pool,
                        node=actor.node_id,
                        queued_ms=_ms_since(delivery) - ran_ms,
                    )
                log.warning("worker_lost_retrying", attempt=active.attempts, error=str(lost))
                log.debug("worker_lost_traceback", exc_info=lost)
                await self._pause_before_retry(active.attempts, None)
                continue
            ran_ms += result.run_ms
            queued_ms = max(0.0, _ms_since(delivery) - ran_ms)
            if result.ok:
                outcome = succeeded(
                    task.id,
                    task.type,
                    result.payload,
                    attempts=active.attempts,
                    pool=pool,
                    node=actor.node_id,
                    queued_ms=queued_ms,
                    run_ms=result.run_ms,
                )
                if len(outcome.reply_body) <= self._max_reply_bytes:
                    return outcome
                # RabbitMQ closes the channel on a message over its max_message_size: such a
                # reply would cost the connection at every try and never be delivered.
                return rejected(
                    Rejection(
                        "too_large",
                        f"the result's reply is {len(outcome.reply_body)} bytes, more than "
                        f"SWARM_MAX_REPLY_MB ({self._settings.max_reply_mb} MiB) allows",
                        task.id,
                    ),
                    task.type,
                    attempts=active.attempts,
                    pool=pool,
                    node=actor.node_id,
                    queued_ms=queued_ms,
                    run_ms=result.run_ms,
                )
            code = result.error_code or "handler_error"
            if result.traceback is not None:
                # One line (the traceback a field of it), with the task id bound by the
                # ingress: the reply carries only "Type: message".
                log.error(
                    "handler_failed",
                    handler=task.handler,
                    attempt=active.attempts,
                    error=result.error_message,
                    traceback=result.traceback,
                )
            if code == "timeout":
                self._retire_if_stuck(spec, actor)
            retry = result.retry_delay_s is not None or (
                code == "timeout" and self._settings.retry_timeouts
            )
            if retry and active.attempts <= max_retries:
                log.info("task_retrying", attempt=active.attempts, reason=result.error_message)
                await self._pause_before_retry(active.attempts, result.retry_delay_s)
                continue
            message = result.error_message or code
            if retry:
                message = f"{message}; gave up after {active.attempts} attempts"
            return rejected(
                Rejection(code, message, task.id, retryable=retry or code == "timeout"),
                task.type,
                attempts=active.attempts,
                pool=pool,
                node=actor.node_id,
                queued_ms=queued_ms,
                run_ms=result.run_ms,
                traceback=result.traceback,
            )

    def _progress_reporter(
        self, delivery: Delivery, task_id: str, attempt: int
    ) -> Callable[[bytes, int], None]:
        """Turns one run's progress reports into progress messages (schemas/progress.py).
        `seq` counts the handler's reports: those the actor dropped (`dropped` before this
        one) leave a gap, so a consumer can tell it missed some."""
        seq = 0

        def report(data: bytes, dropped: int = 0) -> None:
            nonlocal seq
            seq += 1 + dropped
            message = ProgressMessage(id=task_id, progress=decode(data), seq=seq, attempt=attempt)
            self.publish_progress(delivery, encode(message.model_dump(mode="python")))

        return report

    def _retire_if_stuck(self, spec: HandlerSpec, actor: ActorInfo) -> None:
        """A sync handler on a thread goes on after a time limit or a cancel: retire its actor."""
        if not spec.is_async and spec.blocking:
            self._pools.retire(actor)

    async def _pause_before_retry(self, attempt: int, delay_s: float | None) -> None:
        """The handler's own delay when it asked for one; else exponential backoff with full
        jitter, so the retries of a crashed batch spread out."""
        if delay_s is None:
            delay_s = random.uniform(0, self._settings.retry_backoff_s * (2 ** (attempt - 1)))
        await asyncio.sleep(delay_s)

    def _expired(self, task: TaskMessage, attempts: int, queued_ms: float) -> Outcome:
        return rejected(
            Rejection(
                "expired", f"deadline {task.deadline} passed before the task started", task.id
            ),
            task.type,
            status="expired",
            attempts=attempts,
            queued_ms=queued_ms,
        )


def _replayed(delivery: Delivery) -> bool:
    headers = delivery.properties.get("headers")
    return isinstance(headers, dict) and REPLAY_HEADER in headers


async def _cannot_renew(delivery: Delivery, lease: str) -> None:
    raise RuntimeError("no transport to renew a lease on")


def _ms_since(delivery: Delivery) -> float:
    return (time.monotonic() - delivery.received_at_s) * 1000.0
