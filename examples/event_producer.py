"""An event-driven producer: one Swarm task per business event, and no event ever lost.

Consumes JSON events from the durable queue `shop.events` and, for each, sends a
`data_processing` task (handler `HANDLER`) with `SwarmClient.send`, which returns as soon as
RabbitMQ has confirmed the task. Each reply is then awaited by a small task of its own, which logs
one line and only then acknowledges the event:

- A crash at any instant loses no event: an event is acknowledged only after its task's final
  reply arrived, so an unacknowledged one is redelivered to the next run.
- A redelivered event is not run twice: the task id is derived from the event id, and the daemon
  answers an id it already finished with the stored reply (one outcome per task id).
- Memory stays flat however long the queue: the channel's prefetch bounds the events in flight
  (`--in-flight`); the backlog waits in RabbitMQ.

When its connection drops, the service exits with status 1 for its supervisor (systemd,
Kubernetes) to restart it; what was in flight is redelivered then.

    AMQP_URL=amqp://guest:guest@localhost:5672/ python examples/event_producer.py
    python examples/event_producer.py --max-events 10   # stop after 10 events (tests)
"""

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from broker.amqp.connection import connect
from broker.producer.client import SwarmClient
from schemas.errors import SwarmError
from schemas.reply import Reply

HANDLER = "aggregate"  # the built-in data-processing workload (workers/workloads/handlers.py)


def task_args(event: dict[str, Any]) -> dict[str, Any]:
    """What the task computes for an order event: quantity and revenue per SKU."""
    items = [
        {"sku": item["sku"], "qty": item["qty"], "revenue": item["qty"] * item["price"]}
        for item in event.get("items", [])
    ]
    return {
        "records": items,
        "group_by": ["sku"],
        "metrics": {"qty": ["sum"], "revenue": ["sum"]},
    }


TASK_TYPE = "data_processing"
EVENTS_QUEUE = "shop.events"
TASK_ID_PREFIX = "shop-event-"
REPLY_TIMEOUT_S = 600.0  # past it the event is put back on its queue for another try
DRAIN_TIMEOUT_S = 30.0  # on SIGTERM, how long replies still in flight are waited for

log = logging.getLogger("event_producer")


def event_id(message: AbstractIncomingMessage, event: Any) -> str:
    """The event's own id; else the message id; else a digest of the body (stable across
    redeliveries, which is all the task id needs)."""
    if isinstance(event, dict) and isinstance(event.get("id"), str | int):
        return str(event["id"])
    if message.message_id:
        return message.message_id
    return hashlib.sha256(message.body).hexdigest()[:32]


class EventProducer:
    """Turns each delivery of `shop.events` into a task, and acks it once the reply is in."""

    def __init__(self, client: SwarmClient, max_events: int | None, broken: asyncio.Event) -> None:
        self.client = client
        self.max_events = max_events
        self.broken = broken  # set when events can no longer be handled: exit for a restart
        self.taken = 0  # events taken on
        self.settled = 0  # events acked, rejected or put back
        self.limit_reached = asyncio.Event()
        self.idle = asyncio.Event()  # no event in flight
        self.idle.set()
        self.replies: set[asyncio.Task[None]] = set()

    async def on_event(self, message: AbstractIncomingMessage) -> None:
        if self.limit_reached.is_set() or self.broken.is_set():
            return  # not ours to handle: left unacked, RabbitMQ requeues it when we close
        self.taken += 1
        self.idle.clear()
        if self.max_events is not None and self.taken >= self.max_events:
            self.limit_reached.set()
        try:
            event = json.loads(message.body)
        except ValueError as exc:
            # Not JSON: no retry can help. Rejected without requeue (dead-lettered when the
            # queue has a dead-letter exchange), and logged.
            log.warning("event_rejected message_id=%s reason=%s", message.message_id, exc)
            await message.reject(requeue=False)
            self._settle()
            return
        eid = event_id(message, event)
        try:
            future = await self.client.send(
                TASK_TYPE, HANDLER, task_args(event), task_id=TASK_ID_PREFIX + eid
            )
        except SwarmError as exc:  # RabbitMQ refused the task, or stayed unreachable
            log.error("submit_failed event=%s error=%s", eid, exc)
            self.broken.set()
            return
        waiter = asyncio.create_task(self.on_reply(message, eid, future))
        self.replies.add(waiter)
        waiter.add_done_callback(self.replies.discard)

    async def on_reply(
        self, message: AbstractIncomingMessage, eid: str, future: "asyncio.Future[Reply]"
    ) -> None:
        try:
            reply = await asyncio.wait_for(future, REPLY_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("reply_timeout event=%s; event requeued", eid)
            await message.nack(requeue=True)
            self._settle()
            return
        if reply.status == "ok":
            log.info(
                "reply event=%s task=%s status=ok result=%s",
                eid,
                reply.id,
                json.dumps(reply.result["groups"], separators=(",", ":")),
            )
        else:
            # A final outcome all the same (the daemon dead-letters failed tasks): ack it.
            code = reply.error.code if reply.error is not None else reply.status
            status = reply.status
            log.warning("reply event=%s task=%s status=%s code=%s", eid, reply.id, status, code)
        try:
            await message.ack()
        except Exception as exc:  # the channel is gone: the event comes back, and is answered
            log.error("ack_failed event=%s error=%s", eid, exc)  # from the outcome store
            self.broken.set()
            return
        self._settle()

    def _settle(self) -> None:
        self.settled += 1
        if self.settled == self.taken:
            self.idle.set()


async def first_of(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    waits = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def serve(url: str, in_flight: int, max_events: int | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    broken = asyncio.Event()
    events_connection = await connect(url, name="shop-event-producer")
    events_connection.close_callbacks.add(lambda *_: broken.set())
    async with SwarmClient(url) as client:
        channel = await events_connection.channel()
        await channel.set_qos(prefetch_count=in_flight)  # the bound on events in flight
        queue = await channel.declare_queue(EVENTS_QUEUE, durable=True)
        producer = EventProducer(client, max_events, broken)
        tag = await queue.consume(producer.on_event)
        log.info("consuming queue=%s in_flight=%d handler=%s", EVENTS_QUEUE, in_flight, HANDLER)
        await first_of(stop, broken, producer.limit_reached)
        if not broken.is_set():
            await queue.cancel(tag)  # no new events; those in flight still finish
            drain_s = DRAIN_TIMEOUT_S if stop.is_set() else None
            await first_of(producer.idle, broken, timeout_s=drain_s)
        failed = broken.is_set()  # before closing, which sets it too
        for waiter in list(producer.replies):
            waiter.cancel()
        # Closing returns every event still unacked to the queue.
        with contextlib.suppress(Exception):
            await events_connection.close()
    if failed:
        log.error("stopped_broken events=%d; unacked events are redelivered", producer.settled)
        return 1
    log.info("stopped events=%d", producer.settled)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://localhost/"))
    parser.add_argument("--in-flight", type=int, default=32, help="events unacked at a time")
    parser.add_argument("--max-events", type=int, default=None, help="stop after N events")
    options = parser.parse_args()
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        return asyncio.run(serve(options.amqp_url, options.in_flight, options.max_events))
    except SwarmError as exc:  # RabbitMQ unreachable: one clear line, password masked
        print(f"event_producer: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
