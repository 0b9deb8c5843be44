"""The GPU pool on a real GPU, without RabbitMQ: tasks go through the daemon's own pipeline
(intake, placement, ledger, scheduler, pools, SDK context, progress) from in-memory deliveries.

For a machine with a GPU and no broker (RabbitMQ is what the integration tests prove; this
proves what needs the GPU): an embedded Ray detects the GPU, Swarm starts its GPU pool, and
`train` / `predict` tasks run there through PyTorch on CUDA, timed against the same work
pinned to the CPU pool. Prints one JSON document (and writes it to --out).

    python bench/gpu_check.py --out gpu_check.json
"""

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from broker.amqp.outcomes import OutcomeStore
from broker.scheduling.ledger import Ledger
from broker.scheduling.pools import PoolSet
from broker.scheduling.scheduler import Scheduler
from broker.settings import Settings
from broker.tasks.delivery import Delivery
from broker.tasks.processor import TaskProcessor
from schemas.codec import decode, encode
from schemas.topology import CONTENT_TYPE, PROGRESS_HEADER, task_queue
from workers import cluster
from workers.registry import load_handlers

TRAIN = {"samples": 50_000, "features": 128, "classes": 10, "seed": 3}


def delivery(task_type: str, handler: str, args: Any, **fields: Any) -> Delivery:
    body = {"v": 1, "id": uuid.uuid4().hex, "type": task_type, "handler": handler, "args": args}
    body.update(fields)
    return Delivery(
        body=encode(body),
        queue=task_queue(task_type),
        task_type=task_type,
        properties={
            "content_type": CONTENT_TYPE,
            "reply_to": "gpu-check",
            "headers": {PROGRESS_HEADER: True},
        },
        redelivered=False,
        received_at_s=time.monotonic(),
    )


def reply(outcome: Any) -> dict[str, Any]:
    return decode(outcome.reply_body)  # type: ignore[no-any-return]


async def main(scale: float) -> dict[str, Any]:
    model_dir = Path(tempfile.mkdtemp(prefix="swarm-models-"))
    settings = Settings(model_dir=model_dir, gpu_pool_min=1, gpu_pool_max=1, cpu_pool_min=1)
    cluster.connect(None)
    scheduler = Scheduler(Ledger())
    pools = PoolSet(
        settings.pool_specs(),
        settings.handler_modules,
        scheduler,
        settings.pool_idle_s,
        actor_env=settings.actor_environment(),
    )
    started = time.perf_counter()
    await pools.start()
    report: dict[str, Any] = {
        "pools_started": sorted(pools.names),
        "pools_start_s": round(time.perf_counter() - started, 2),
        "nodes": [
            {"node": n.node_id[:12], "total": n.total.as_dict()}
            for n in scheduler.ledger.alive_nodes()
        ],
    }
    processor = TaskProcessor(
        settings,
        load_handlers(settings.handler_modules),
        scheduler,
        pools,
        OutcomeStore(settings.outcome_retention_s),
    )
    progress: list[dict[str, Any]] = []
    processor.publish_progress = lambda _, body: progress.append(decode(body))

    generate = {**TRAIN, "samples": int(TRAIN["samples"] * scale)}
    train_args = {"model": "gpu-check", "generate": generate, "epochs": 20, "hidden": 512}
    for pool, batch_size in (("gpu", 64), ("cpu", 64), ("gpu", 4096), ("cpu", 4096)):
        progress.clear()
        args = {**train_args, "model": f"gpu-check-{pool}", "batch_size": batch_size}
        outcome = await processor.process(delivery("training", "train", args, pool=pool))
        answer = reply(outcome)
        result = answer["result"] or {}
        report[f"train_on_{pool}_batch_{batch_size}"] = {
            "status": answer["status"],
            "error": answer["error"],
            "pool": answer["pool"],
            "backend": result.get("backend"),
            "device": result.get("device"),
            "accuracy": result.get("accuracy"),
            "loss": result.get("loss"),
            "run_ms": round(answer["timing"]["run_ms"], 1),
            "progress_messages": len(progress),
            "last_progress": progress[-1]["progress"] if progress else None,
        }

    # Inference placed by the scheduler (no pin): the GPU pool, batched in the actor.
    rows = [[0.01 * ((i * 7 + j) % 100) for j in range(TRAIN["features"])] for i in range(64)]
    # The GPU-trained model; the CPU-trained one where no GPU pool runs (a smoke run).
    gpu_trained = report["train_on_gpu_batch_4096"]["status"] == "ok"
    model = "gpu-check-gpu" if gpu_trained else "gpu-check-cpu"
    # The GPU share per inference task bounds how many the ledger admits to one actor at once,
    # and so the largest batch: the default (0.25) admits 4, a share of 1/64 a full batch.
    for count, share in (
        (1, None),
        (max(1, int(512 * scale)), None),
        (max(1, int(512 * scale)), 1 / 64),
    ):
        extra = {"resources": {"gpus": share}} if share else {}
        tic = time.perf_counter()
        outcomes = await asyncio.gather(
            *(
                processor.process(
                    delivery("inference", "predict", {"model": model, "inputs": rows}, **extra)
                )
                for _ in range(count)
            )
        )
        elapsed = time.perf_counter() - tic
        answers = [reply(o) for o in outcomes]
        for o in outcomes:
            processor.settled(o)
        ok = [a for a in answers if a["status"] == "ok"]
        report[f"predict_{count}_tasks_gpu_share_{share or 'default'}"] = {
            "ok": len(ok),
            "errors": sorted({json.dumps(a["error"]) for a in answers if a["error"]}),
            "pools": sorted({a["pool"] for a in answers}),
            "rows_per_s": round(count * len(rows) / elapsed),
            "tasks_per_s": round(count / elapsed),
            "batch_sizes_max": max((a["result"]["batch"] for a in ok), default=0),
            "batch_sizes_median": statistics.median([a["result"]["batch"] for a in ok] or [0]),
            "run_ms_median": round(
                statistics.median([a["timing"]["run_ms"] for a in ok] or [0]), 2
            ),
        }
    data = {"columns": {"k": [i % 10 for i in range(100_000)], "v": list(range(100_000))}}
    answer = reply(
        await processor.process(
            delivery(
                "data_processing",
                "aggregate",
                {**data, "group_by": ["k"], "metrics": {"v": ["sum", "mean"]}},
            )
        )
    )
    report["aggregate"] = {
        "status": answer["status"],
        "pool": answer["pool"],
        "groups": len((answer["result"] or {}).get("groups", [])),
        "run_ms": round(answer["timing"]["run_ms"], 1),
    }
    pools.stop()
    return report


def nvidia_smi() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the work (smoke runs)")
    options = parser.parse_args()
    result = {"nvidia_smi": nvidia_smi(), **asyncio.run(main(options.scale))}
    options.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
