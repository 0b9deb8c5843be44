"""The wire topology, declared idempotently with the arguments every daemon must share.

Task, control and dead-letter queues are quorum queues: replicated when RabbitMQ is clustered,
and they support single active consumer, so that a standby daemon takes over a queue the moment
the active one's connection drops. Task queues dead-letter to `swarm.dead`, so a message whose
`expiration` runs out while queued is dead-lettered by RabbitMQ itself.
"""

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from schemas.topology import (
    CONTROL_QUEUE,
    CONTROL_QUEUE_ARGUMENTS,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    DEAD_QUEUE_ARGUMENTS,
    RESULTS_EXCHANGE,
    TASK_QUEUE_ARGUMENTS,
    TASK_TYPES,
    TASKS_EXCHANGE,
    task_queue,
)


class Topology:
    """Handles to the declared exchanges and queues on one channel."""

    def __init__(
        self,
        tasks: AbstractExchange,
        dead: AbstractExchange,
        results: AbstractExchange,
        task_queues: dict[str, AbstractQueue],
        control: AbstractQueue,
        dead_queue: AbstractQueue,
    ) -> None:
        self.tasks = tasks
        self.dead = dead
        self.results = results
        self.task_queues = task_queues
        self.control = control
        self.dead_queue = dead_queue


async def declare(channel: AbstractChannel) -> Topology:
    tasks = await channel.declare_exchange(
        TASKS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    dead = await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    results = await channel.declare_exchange(
        RESULTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    task_queues = {}
    for task_type in TASK_TYPES:
        queue = await channel.declare_queue(
            task_queue(task_type), durable=True, arguments=TASK_QUEUE_ARGUMENTS
        )
        await queue.bind(tasks, routing_key=task_type)
        task_queues[task_type] = queue
    dead_queue = await channel.declare_queue(
        DEAD_QUEUE, durable=True, arguments=DEAD_QUEUE_ARGUMENTS
    )
    await dead_queue.bind(dead)
    control = await channel.declare_queue(
        CONTROL_QUEUE, durable=True, arguments=CONTROL_QUEUE_ARGUMENTS
    )
    return Topology(tasks, dead, results, task_queues, control, dead_queue)
