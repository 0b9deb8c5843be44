"""Inference with real payloads: `predict` tasks of 64 rows x 128 features through Swarm,
against the ceiling of the same model called directly inside one Ray actor.

- The model: the built-in workloads' MLP (workers/workloads/mlp.py), 128 features, hidden
  256, 10 classes, trained briefly on generated data and saved in a model store of the
  bench's own (the daemon gets it as SWARM_MODEL_DIR).
- The rows: `generate_dataset(tasks x 64, 128, 10, seed)`, the same for both, as lists.
- `swarm`: each task `{"model", "inputs": 64 rows}` to the built-in `predict` handler (its
  CPU pool batches queued tasks, up to 64 per model call), published by the bench's client
  (window as for echo) after an unmeasured batch; rows/s from the first publish to the last
  reply, every reply checked (status ok, 64 predictions).
- `predict-ceiling`: bench/predict_ceiling.py in a process of its own joins the same Ray and
  calls one actor (one CPU, the model loaded once) with the same rows in batches of 64 tasks,
  all batches submitted at once after an unmeasured one; the actor answers each task as the
  handler does (labels and rounded probabilities). No RabbitMQ, no codec, no scheduling.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from client import TASK_TYPE, TASKS_EXCHANGE, BenchError, Codec, LoadClient, percentile
from procs import SharedRay, ray_auth_mode, stop_process
from systems import bench_env

HERE = Path(__file__).resolve().parent
MODEL = "bench-mlp"
FEATURES = 128
HIDDEN = 256
CLASSES = 10
ROWS_PER_TASK = 64
BATCH_TASKS = 64  # the ceiling's tasks per actor call: the handler's batch_max
ROWS_SEED = 1
CONTENT_TYPE = "application/msgpack"
CEILING_TIMEOUT_S = 600.0
DEFAULT_TASKS = 512


def save_model(model_dir: Path) -> dict[str, Any]:
    """Train the MLP a little on generated data and save it as `MODEL` under `model_dir`."""
    from workers.workloads import mlp
    from workers.workloads.store import ModelStore

    x, y = mlp.generate_dataset(2048, FEATURES, CLASSES, seed=0)
    result = mlp.train(x, y, classes=CLASSES, hidden=HIDDEN, epochs=2, use_gpu=False)
    ModelStore(model_dir).save(MODEL, result.weights, {"backend": result.backend})
    return {"loss": round(result.loss, 4), "accuracy": round(result.accuracy, 4)}


def task_inputs(tasks: int) -> list[list[list[float]]]:
    """Each task's rows, as lists; the same for a given number of tasks."""
    from workers.workloads import mlp

    x, _ = mlp.generate_dataset(tasks * ROWS_PER_TASK, FEATURES, CLASSES, seed=ROWS_SEED)
    rows: list[list[float]] = x.tolist()
    return [rows[i : i + ROWS_PER_TASK] for i in range(0, len(rows), ROWS_PER_TASK)]


@dataclass
class Workload:
    """The predict tasks of a bench: the model's store and each task's packed `args`."""

    model_dir: Path
    tasks: int
    model: dict[str, Any]
    packed_args: list[bytes] = field(repr=False)

    @classmethod
    def prepare(cls, model_dir: Path, tasks: int) -> Workload:
        model = save_model(model_dir)
        packed = [
            msgpack.packb({"model": MODEL, "inputs": inputs}, use_bin_type=True)
            for inputs in task_inputs(tasks)
        ]
        return cls(model_dir, tasks, model, packed)

    def codec(self, batches: list[int]) -> Codec:
        """Swarm's `predict` tasks, the args taken in turn; each reply's batch size (how many
        tasks the handler ran in one call) is appended to `batches`."""
        turn = itertools.cycle(self.packed_args)

        def make(task_id: str, args: bytes, reply_to: str) -> tuple[bytes, dict[str, Any]]:
            head = msgpack.packb(
                {"v": 1, "id": task_id, "type": TASK_TYPE, "handler": "predict"},
                use_bin_type=True,
            )
            # A fixmap of four entries plus a fifth, `args`, already packed.
            body = b"\x85" + head[1:] + msgpack.packb("args") + next(turn)
            return body, {"content_type": CONTENT_TYPE, "message_id": task_id}

        def check(reply: bytes, sent: bytes, args: bytes) -> str | None:
            answer = msgpack.unpackb(reply, raw=False)
            if answer.get("status") != "ok":
                return f"predict answered {answer.get('status')!r}: {answer.get('error')}"
            result = answer.get("result") or {}
            if len(result.get("predictions", ())) != ROWS_PER_TASK:
                return f"predict gave no {ROWS_PER_TASK} predictions"
            batches.append(int(result.get("batch", 0)))
            return None

        return Codec("swarm-predict", TASKS_EXCHANGE, TASK_TYPE, make, check)


async def run_swarm(url: str, workload: Workload, window: int, timeout_s: float) -> dict[str, Any]:
    """`workload.tasks` predict tasks through a ready Swarm daemon on `url`, after one
    unmeasured batch (so that the pool's actors have the model loaded)."""
    batches: list[int] = []
    async with LoadClient(url, workload.codec(batches)) as client:
        await client.run(min(BATCH_TASKS, workload.tasks), window, b"", timeout_s=timeout_s)
        batches.clear()
        run = await client.run(workload.tasks, window, b"", timeout_s=timeout_s)
    return {
        "tasks": run.tasks,
        "rows": run.tasks * ROWS_PER_TASK,
        "seconds": round(run.seconds, 4),
        "rows_per_s": round(run.tasks * ROWS_PER_TASK / run.seconds, 1),
        "tasks_per_s": round(run.tasks_per_s, 1),
        "mean_batch": round(statistics.mean(batches), 1) if batches else None,
        "p50_ms": round(percentile(run.latencies_ms, 50), 2),
        "p99_ms": round(percentile(run.latencies_ms, 99), 2),
    }


async def run_ceiling(
    workload: Workload, ray: SharedRay | None, ray_cpus: int, log_dir: Path, tag: str
) -> dict[str, Any]:
    """bench/predict_ceiling.py on the same Ray (or a local one), its result."""
    out = log_dir / f"predict-ceiling-{tag}.json"
    out.unlink(missing_ok=True)
    env = bench_env(
        PYTHONUNBUFFERED="1",
        RAY_AUTH_MODE=ray_auth_mode(),
        RAY_ADDRESS=ray.address if ray is not None else "local",
        BENCH_RAY_CPUS=str(ray_cpus),
    )
    command = [
        sys.executable,
        str(HERE / "predict_ceiling.py"),
        f"--model-dir={workload.model_dir}",
        f"--tasks={workload.tasks}",
        f"--out={out}",
    ]
    log_path = log_dir / f"predict-ceiling-{tag}.log"

    def run() -> int | None:
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=HERE.parent,
            )
        try:
            return process.wait(CEILING_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_process(process, grace_s=10.0)
            return None

    code = await asyncio.to_thread(run)
    if code != 0 or not out.exists():
        raise BenchError(f"predict-ceiling exited with {code}; see {log_path}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# -- the table -------------------------------------------------------------------------------


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per system (the ceiling first): the median rows/s over the rounds and its
    ratio to the ceiling's median; each round's ratio to the ceiling of the same round."""
    rows: list[dict[str, Any]] = []
    ceiling_by_round = {
        r["round"]: r["rows_per_s"] for r in records if r["system"] == "predict-ceiling"
    }
    ceiling = statistics.median(ceiling_by_round.values()) if ceiling_by_round else None
    for name in ("predict-ceiling", "swarm"):
        mine = [r for r in records if r["system"] == name]
        if not mine:
            continue
        rates = [r["rows_per_s"] for r in mine]
        rate = statistics.median(rates)
        batches = [r["mean_batch"] for r in mine if r.get("mean_batch")]
        rows.append(
            {
                "system": name,
                "tasks": mine[0]["tasks"],
                "rows_per_task": ROWS_PER_TASK,
                "rows_per_s": round(rate, 1),
                "rows_per_s_rounds": rates,
                "tasks_per_s": round(rate / ROWS_PER_TASK, 1),
                "ratio_vs_ceiling": round(rate / ceiling, 3) if ceiling else None,
                "ratio_vs_ceiling_rounds": [
                    round(r["rows_per_s"] / ceiling_by_round[r["round"]], 3)
                    for r in mine
                    if ceiling_by_round.get(r["round"])
                ],
                "mean_batch": round(statistics.mean(batches), 1) if batches else None,
                # The median of the rounds' p50s and the worst p99 (the ceiling has none: it
                # answers in calls of 64 tasks).
                "p50_ms": _median_or_none([r["p50_ms"] for r in mine if "p50_ms" in r]),
                "p99_ms": max((r["p99_ms"] for r in mine if "p99_ms" in r), default=None),
            }
        )
    return rows


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("predict", "tasks", "rows/s", "min..max", "x ceiling", "batch", "p50", "p99")
    lines = [header]
    for row in rows:
        rates = row["rows_per_s_rounds"]
        ratio = row["ratio_vs_ceiling"]
        lines.append(
            (
                row["system"],
                str(row["tasks"]),
                f"{row['rows_per_s']:.0f}",
                f"{min(rates):.0f}..{max(rates):.0f}",
                f"{ratio:.2f}" if ratio is not None else "-",
                f"{row['mean_batch']:.1f}" if row["mean_batch"] else "-",
                f"{row['p50_ms']:.0f}" if row["p50_ms"] is not None else "-",
                f"{row['p99_ms']:.0f}" if row["p99_ms"] is not None else "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    title = (
        f"{ROWS_PER_TASK} rows x {FEATURES} features per task, "
        f"MLP {FEATURES}-{HIDDEN}-{CLASSES}; p50/p99 ms per task"
    )
    return title + "\n" + "\n".join(out)
