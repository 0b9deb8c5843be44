"""The event-driven producer example (examples/event_producer.py) against a real daemon: every
event becomes a task, each reply is logged, and an event is acked only once its reply arrived."""

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import aio_pika

from broker.daemon import Daemon

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "event_producer.py"
EVENTS = 10
REPLY_LINE = re.compile(r"reply event=(\S+) task=(\S+) status=(\S+)")
RESULT_LINE = re.compile(r"reply event=order-2 task=\S+ status=ok result=(\S+)")


async def publish_events(amqp_url: str, events: list[dict[str, object]]) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue("shop.events", durable=True)  # as the example declares it
        for event in events:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    json.dumps(event).encode(),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                "shop.events",
            )


async def queue_depth(amqp_url: str, name: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return count


async def test_every_event_becomes_a_task_and_is_acked_after_its_reply(
    daemon: Daemon, amqp_url: str
) -> None:
    events = [
        {
            "id": f"order-{n}",
            "kind": "order_placed",
            "items": [
                {"sku": "tea", "qty": n + 1, "price": 2.5},
                {"sku": "cup", "qty": 1, "price": 4.0},
                {"sku": "tea", "qty": 1, "price": 2.5},
            ],
        }
        for n in range(EVENTS)
    ]
    await publish_events(amqp_url, events)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--max-events",
        str(EVENTS),
        "--in-flight",
        "4",
        env={**os.environ, "AMQP_URL": amqp_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode() + out.decode()
    replies = [m.groups() for m in REPLY_LINE.finditer(out.decode())]
    assert len(replies) == EVENTS, out.decode()
    assert sorted(event for event, _, _ in replies) == sorted(e["id"] for e in events)
    assert all(task == f"shop-event-{event}" for event, task, _ in replies)
    assert all(status == "ok" for _, _, status in replies)
    assert await queue_depth(amqp_url, "shop.events") == 0
    result = RESULT_LINE.search(out.decode())
    assert result is not None, out.decode()
    assert json.loads(result.group(1)) == [
        {"sku": "cup", "qty_sum": 1, "revenue_sum": 4.0},
        {"sku": "tea", "qty_sum": 4, "revenue_sum": 10.0},
    ]
