"""The age of the oldest task waiting per task queue, from the daemon's own view.

Quorum queues do not report the age of their oldest message, so the daemon reports what it
holds: tasks it received and has not started, waiting in the scheduler for room on an actor
or for a scale-up (a retry, which ran before, is not counted). Tasks still in RabbitMQ beyond
the prefetch window are not seen here: `swarm_queue_depth` counts them.

A task's age starts at its AMQP `timestamp` property when the producer set one (clamped to
at least 0: a producer's clock ahead of ours is not a negative age), else when the daemon
received the delivery. Computed at refresh time, once per waiting task: nothing is added to
a task's own path but keeping its delivery with its waiter.
"""

import datetime
import time
from collections.abc import Iterable
from typing import Any

from broker.tasks.delivery import Delivery


def waiting_age_s(delivery: Delivery, now_s: float, now_monotonic_s: float) -> float:
    """Seconds `delivery` has waited: from its `timestamp` (unix seconds) if it has one, else
    from its arrival (`received_at_s`, on the monotonic clock)."""
    stamp = delivery.properties.get("timestamp")
    if isinstance(stamp, datetime.datetime):
        if stamp.tzinfo is None:  # AMQP timestamps are UTC
            stamp = stamp.replace(tzinfo=datetime.timezone.utc)
        return max(0.0, now_s - stamp.timestamp())
    if isinstance(stamp, int | float) and not isinstance(stamp, bool):
        return max(0.0, now_s - float(stamp))
    return max(0.0, now_monotonic_s - delivery.received_at_s)


def oldest_waiting(
    waiting: Iterable[tuple[str | None, Any]],
    queues: Iterable[str],
    now_s: float | None = None,
    now_monotonic_s: float | None = None,
) -> dict[str, float]:
    """Per queue, the age of its oldest waiting task: every queue in `queues` (0 when none
    waits) and any other that a waiter names. `waiting` is (queue, delivery) pairs, as
    `Scheduler.waiting_origins` yields them; anything that is not a Delivery is skipped."""
    now_s = time.time() if now_s is None else now_s
    now_monotonic_s = time.monotonic() if now_monotonic_s is None else now_monotonic_s
    ages = dict.fromkeys(queues, 0.0)
    for queue, origin in waiting:
        if queue is None or not isinstance(origin, Delivery):
            continue
        age = waiting_age_s(origin, now_s, now_monotonic_s)
        if age >= ages.get(queue, 0.0):
            ages[queue] = age
    return ages
