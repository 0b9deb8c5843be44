"""A demo producer: waits for the daemon, sends tasks of each type, and prints the replies."""

import asyncio
import os
import time

from rich.console import Console
from rich.table import Table

from broker.client import SwarmClient
from schemas.errors import SwarmError

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/")

TASKS = [
    ("inference", "echo", {"x": 1}),
    ("training", "sleep", {"seconds": 0.5}),
    ("data_processing", "echo", {"rows": [1, 2, 3]}),
    ("inference", "fail", {"message": "a handler error, on purpose"}),
]


async def wait_for_daemon(client: SwarmClient, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.status(timeout_s=5.0)
            return
        except SwarmError:
            if time.monotonic() > deadline:
                raise


async def main() -> None:
    console = Console()
    async with SwarmClient(URL, reply_timeout_s=60) as client:
        with console.status("waiting for the daemon..."):
            await wait_for_daemon(client)
        futures = [await client.send(t, h, a) for t, h, a in TASKS]
        replies = await asyncio.gather(*futures)
    table = Table(title="Swarm demo: one task of each kind through RabbitMQ and Ray")
    for column in ("type", "handler", "status", "result / error", "pool", "node", "run ms"):
        table.add_column(column)
    for (task_type, handler, _), reply in zip(TASKS, replies, strict=True):
        shown = reply.result if reply.status == "ok" else reply.error.code if reply.error else ""
        table.add_row(
            task_type,
            handler,
            reply.status,
            str(shown),
            reply.pool or "",
            (reply.node or "")[:12],
            f"{reply.timing.run_ms:.1f}",
        )
    console.print(table)


if __name__ == "__main__":
    asyncio.run(main())
