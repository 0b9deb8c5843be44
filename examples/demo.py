"""The demo producer: one task of each type doing real work, through RabbitMQ and Ray.

A model is trained (its loss shown live, from the task's progress messages), then used for
inference on fresh data, and a data set of orders is aggregated; the replies are shown as a
table. Run by `bash scripts/run.sh` next to the daemon; AMQP_URL picks the broker.
"""

import asyncio
import os
import random
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from broker.producer.client import SwarmClient
from schemas.errors import SwarmError
from schemas.progress import ProgressMessage
from schemas.reply import Reply

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/")
MODEL = "demo-blobs"
DATA = {"samples": 900, "features": 8, "classes": 3, "seed": 42}


async def wait_for_daemon(client: SwarmClient, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.status(wait_s=5.0)
            return
        except SwarmError:
            if time.monotonic() > deadline:
                raise


def orders(count: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    regions = ["eu-west", "us-east", "ap-south"]
    return [
        {
            "region": rng.choice(regions),
            "amount": round(rng.uniform(5, 500), 2),
            "items": rng.randint(1, 9),
        }
        for _ in range(count)
    ]


def fresh_points(count: int) -> tuple[list[list[float]], list[int]]:
    """Points the model never saw, from the training distribution (same seed, same centres),
    with their true classes to score the predictions against."""
    from workers.workloads.mlp import generate_dataset

    total = DATA["samples"] + count
    x, y = generate_dataset(total, DATA["features"], DATA["classes"], DATA["seed"])
    return x[-count:].round(3).tolist(), y[-count:].tolist()


async def run_demo(url: str = URL, console: Console | None = None) -> list[tuple[str, Reply]]:
    console = console or Console()
    steps: list[tuple[str, Reply]] = []
    async with SwarmClient(url, reply_timeout_s=300) as client:
        with console.status("waiting for the daemon..."):
            await wait_for_daemon(client)

        def show(progress: ProgressMessage) -> None:
            report = progress.progress
            console.print(
                f"  training: epoch {report['epoch']:>3}/{report['of']}  "
                f"loss {report['loss']:.4f}  accuracy {report['accuracy']:.3f}"
            )

        console.print(
            f"[bold]1. training[/] an MLP classifier {MODEL!r} on {DATA['samples']} points"
        )
        trained = await asyncio.wait_for(
            await client.send(
                "training",
                "train",
                {"model": MODEL, "generate": DATA, "epochs": 80, "report_every": 20},
                on_progress=show,
            ),
            300,
        )
        steps.append(("train", trained))

        console.print(
            "[bold]2. inference[/]: 8 predict tasks on fresh points, batched by the actor"
        )
        points, truth = fresh_points(64)
        futures = [
            await client.send("inference", "predict", {"model": MODEL, "inputs": points[i : i + 8]})
            for i in range(0, 64, 8)
        ]
        predicted = await asyncio.gather(*futures)
        steps.extend(("predict", reply) for reply in predicted)
        right = sum(
            label == want
            for reply, wants in zip(
                predicted, (truth[i : i + 8] for i in range(0, 64, 8)), strict=True
            )
            if reply.status == "ok"
            for label, want in zip(reply.result["predictions"], wants, strict=True)
        )
        console.print(f"  {right} of 64 fresh points classified correctly")

        console.print("[bold]3. data processing[/]: 5,000 orders aggregated by region")
        aggregated = await client.submit(
            "data_processing",
            "aggregate",
            {
                "records": orders(5000),
                "group_by": ["region"],
                "metrics": {"amount": ["sum", "mean", "max"], "items": ["sum"]},
                "where": [["amount", ">=", 20]],
            },
        )
        steps.append(("aggregate", aggregated))
    console.print(summary(steps))
    return steps


def summary(steps: list[tuple[str, Reply]]) -> Table:
    table = Table(title="Swarm demo: training, inference and data processing via RabbitMQ and Ray")
    for column in ("handler", "status", "result", "pool", "node", "run ms"):
        table.add_column(column)
    for handler, reply in steps:
        table.add_row(
            handler,
            reply.status,
            describe(handler, reply),
            reply.pool or "",
            (reply.node or "")[:12],
            f"{reply.timing.run_ms:.1f}",
        )
    return table


def describe(handler: str, reply: Reply) -> str:
    if reply.status != "ok":
        return f"{reply.error.code}: {reply.error.message}" if reply.error else reply.status
    result = reply.result
    if handler == "train":
        return (
            f"model {result['model']} v{result['version']}: accuracy {result['accuracy']:.3f}, "
            f"loss {result['loss']:.4f} ({result['backend']} on {result['device']})"
        )
    if handler == "predict":
        return f"classes {result['predictions']} (batch of {result['batch']})"
    return "; ".join(
        f"{g['region']}: {g['amount_sum']:.0f} over {g['items_sum']} items"
        for g in result["groups"]
    )


if __name__ == "__main__":
    replies = asyncio.run(run_demo())
    raise SystemExit(0 if all(reply.status == "ok" for _, reply in replies) else 1)
