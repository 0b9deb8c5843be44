"""The lease keeper of a long task: renewal copies, so that no delivery is held past
RabbitMQ's consumer timeout (30 min by default), after which RabbitMQ would close the channel
and redeliver everything on it.

Every `renew_s`, a copy of the task message goes back on its queue (confirmed), and only then
is the delivery being run acknowledged (`Settlement.renewed`: its processing then settles it
without a word to RabbitMQ). The copy waits in the queue, or on this daemon held as a
duplicate, until the next renewal or the outcome; if this daemon dies, the copy is the task's
message for the next one. At no instant is the task only in memory.

Nothing a renewal raises ends the keeper: it is logged (`lease_renewal_failed`,
`lease_settle_failed`) and the renewal tried again `renew_s` later; should the keeper end
anyway, that is logged too (`lease_keeper_stopped`).
"""

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from broker.tasks.active import ActiveTask
from broker.tasks.delivery import Delivery, Settlement
from broker.tasks.leases import LeaseSeal

log = structlog.get_logger("swarm.leases")

Renew = Callable[[Delivery, str], Awaitable[None]]


def start(keeping: Coroutine[Any, Any, None], task_id: str) -> "asyncio.Task[None]":
    """Run a keeper as a task whose end, other than by cancellation, is logged."""
    keeper = asyncio.create_task(keeping)

    def observe(done: "asyncio.Task[None]") -> None:
        if not done.cancelled() and done.exception() is not None:
            error = done.exception()
            log.error(
                "lease_keeper_stopped", task_id=task_id, error=f"{type(error).__name__}: {error}"
            )
            log.debug("lease_keeper_stopped_traceback", exc_info=error)

    keeper.add_done_callback(observe)
    return keeper


async def keep_lease(
    delivery: Delivery, active: ActiveTask, renew: Renew, seal: LeaseSeal, renew_s: float
) -> None:
    """Renew `delivery`'s lease every `renew_s` until cancelled (when the task ends)."""
    original = delivery.settle_token  # the delivery being run: acked at the first renewal
    held: list[Settlement] = []  # copies held since the renewal before: acked at this one
    lease = delivery.lease
    # The copy is the task's next delivery should this run never end: it carries this one in
    # its count (broker/tasks/leases.py), so the redelivery limit holds across copies.
    deliveries = delivery.earlier_deliveries + 1
    while True:
        try:
            await renew(delivery, seal.header_value(delivery, lease + 1, deliveries))
        except Exception as exc:
            # Nothing is acked without its copy queued: the deliveries stay held (and go back
            # to the queue if RabbitMQ's consumer_timeout closes the channel first).
            log.error(
                "lease_renewal_failed",
                lease=lease + 1,
                error=f"{type(exc).__name__}: {exc}",
                retry_in_s=renew_s,
            )
            log.debug("lease_renewal_failed_traceback", exc_info=True)
        else:
            lease += 1
            if original is not None:
                settling, original = original, None
                await _settle(settling.renewed(), lease)
            # Taken off the list before each ack, which is shared with the task's end
            # (TaskProcessor.settled): a copy is settled once, even if the task ends here.
            while held:
                await _settle(held.pop(0).ack(), lease)
            held = active.renewed_copies = active.copies
            active.copies = []
            log.info("lease_renewed", lease=lease)
        await asyncio.sleep(renew_s)


async def _settle(settling: Awaitable[None], lease: int) -> None:
    try:
        await settling
    except Exception as exc:
        log.error("lease_settle_failed", lease=lease, error=f"{type(exc).__name__}: {exc}")
        log.debug("lease_settle_failed_traceback", exc_info=True)
