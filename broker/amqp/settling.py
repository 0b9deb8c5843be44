"""What the ingress does with one delivery: hand it to its processor, publish the outcome,
and only then acknowledge it. The one place that decides ack and requeue.

Why this order: an ack before the outcome is published (and recorded in the outcome store)
could lose the task's answer with a connection; a requeue whenever anything short of that
happened means RabbitMQ delivers it again, and the redelivery is answered from the outcome
store, not run twice.
"""

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from broker.amqp.outcome_publishing import PublishAbandoned
from broker.amqp.outcomes import OutcomeStore
from broker.tasks.delivery import Delivery
from broker.tasks.outcome import Outcome

# The ingress's logger: these lines are the ingress's, as they were before this module.
log = structlog.get_logger("swarm.ingress")

Processor = Callable[[Delivery], Awaitable[Outcome]]
# Publishes the outcome (and its outcome record, if any); raises PublishAbandoned past its
# limits (broker/amqp/outcome_publishing.py).
Publish = Callable[[Delivery, Outcome, bytes | None], Awaitable[None]]


async def handle(
    delivery: Delivery,
    process: Processor,
    *,
    store: OutcomeStore,
    progress_sent: Callable[[Delivery], Awaitable[None]],
    publish: Publish,
    on_settled: Callable[[Outcome], None],
) -> None:
    """Process, publish and settle one delivery; returns once it is settled or handed back."""
    # Every line logged while the delivery is processed and settled carries its queue, and
    # once its outcome names one, its task id (the processor binds it earlier, around the
    # run of an admitted task); tasks started meanwhile inherit both.
    structlog.contextvars.bind_contextvars(queue=delivery.queue)
    try:
        await _process_and_settle(delivery, process, store, progress_sent, publish, on_settled)
    finally:
        structlog.contextvars.unbind_contextvars("queue", "task_id")


async def _process_and_settle(
    delivery: Delivery,
    process: Processor,
    store: OutcomeStore,
    progress_sent: Callable[[Delivery], Awaitable[None]],
    publish: Publish,
    on_settled: Callable[[Outcome], None],
) -> None:
    assert delivery.settle_token is not None
    settlement = delivery.settle_token
    outcome: Outcome | None = None
    try:
        outcome = await process(delivery)
        if outcome.task_id is not None:
            structlog.contextvars.bind_contextvars(task_id=outcome.task_id)
        record = None
        if outcome.recorded:
            assert outcome.task_id is not None
            record = store.outcome_record(outcome.task_id, outcome.status, outcome.reply_body)
        if outcome.reply:
            # The task's progress messages go first: the reply is the last it sends.
            await progress_sent(delivery)
            await publish(delivery, outcome, record)
        if record is not None:
            store.apply(record)
    except asyncio.CancelledError:
        # Shutting down: hand the task back to RabbitMQ for another daemon.
        await settlement.requeue()
        raise
    except PublishAbandoned:
        # Logged once where it was given up (`publish_abandoned`): back to the queue.
        await settlement.requeue()
        return
    except Exception:
        # Unexpected (a bug): the traceback goes with the line.
        log.exception("delivery_failed", action="requeued", message_id=delivery.message_id)
        await settlement.requeue()
        return
    finally:
        if outcome is not None:
            on_settled(outcome)
    if not outcome.settle:
        # Held by the task running here (a renewal copy or redelivery of it), which settles
        # it; its body was let go when it was handed over, so held memory is what `held`
        # says.
        return
    await settlement.ack()
