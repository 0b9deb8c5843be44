"""The ceiling of `predict`: the bench's model called directly inside one Ray actor, with the
same rows as Swarm's tasks (as lists), in calls of 64 tasks (see bench/predict.py).

    RAY_ADDRESS=HOST:PORT python bench/predict_ceiling.py --model-dir DIR --tasks 512 --out F
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray
from predict import BATCH_TASKS, MODEL, ROWS_PER_TASK, task_inputs

from workers.workloads import mlp
from workers.workloads.store import ModelStore


@ray.remote(num_cpus=1)  # one CPU, like each actor of Swarm's CPU pool
class Model:
    def __init__(self, model_dir: str) -> None:
        self.weights, _ = ModelStore(Path(model_dir)).load(MODEL)

    def predict(self, batch: list[list[list[float]]]) -> list[dict[str, Any]]:
        """Each task's labels and probabilities, as the `predict` handler answers them."""
        rows = [row for inputs in batch for row in inputs]
        labels, probabilities = mlp.predict(self.weights, rows, use_gpu=False)
        answers = []
        start = 0
        for inputs in batch:
            end = start + len(inputs)
            answers.append(
                {
                    "predictions": labels[start:end].tolist(),
                    "probabilities": [
                        [round(p, 6) for p in row] for row in probabilities[start:end].tolist()
                    ],
                }
            )
            start = end
        return answers


def measure(model_dir: Path, tasks: int) -> dict[str, Any]:
    inputs = task_inputs(tasks)
    batches = [inputs[i : i + BATCH_TASKS] for i in range(0, len(inputs), BATCH_TASKS)]
    actor = Model.remote(str(model_dir))  # type: ignore[attr-defined]
    ray.get(actor.predict.remote(batches[0]))  # unmeasured: placed, started, model loaded
    started = time.perf_counter()
    answers = ray.get([actor.predict.remote(batch) for batch in batches])
    seconds = time.perf_counter() - started
    answered = sum(len(batch) for batch in answers)
    if answered != tasks or any(len(a["predictions"]) != ROWS_PER_TASK for b in answers for a in b):
        raise SystemExit(f"predict-ceiling: {answered} answers for {tasks} tasks")
    return {
        "tasks": tasks,
        "rows": tasks * ROWS_PER_TASK,
        "seconds": round(seconds, 4),
        "rows_per_s": round(tasks * ROWS_PER_TASK / seconds, 1),
        "tasks_per_s": round(tasks / seconds, 1),
        "mean_batch": round(tasks / len(batches), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/predict_ceiling.py", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray.init(address="local", num_cpus=int(os.environ.get("BENCH_RAY_CPUS", "2")))
    else:
        ray.init(address=address)
    try:
        result = measure(args.model_dir, args.tasks)
    finally:
        ray.shutdown()
    args.out.write_text(json.dumps(result) + "\n")
    print(json.dumps(result), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
