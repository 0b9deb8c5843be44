"""The scheduler at scale: what one placement decision costs as the cluster grows.

Drives the daemon's own placement rules, scheduler and ledger (plain Python: no Ray, no
RabbitMQ) on synthetic clusters of 10 to 1,000 nodes and 100 to 10,000 actors in three pools
(CPU, GPU, memory), with tasks arriving faster than they finish: every queue keeps
`--waiting` tasks waiting for room (the daemon pauses a queue's consumer there), and each
finish wakes them. A decision is what the daemon does per task (broker/tasks/processor.py):

    rules.place(task, running, capacity)      the pool and the request
    scheduler.acquire(pool, request, ...)     an actor with room, or a wait (and its wake)
    scheduler.release(pool, actor, request)   the room back, waiters woken
    ledger.drained()                          PoolSet.reap(): retired actors to stop

Only these calls are timed (the waits are stepped by hand, so asyncio's task machinery is not
in the figure). Prints a table per size and, with --json, one JSON document.

    python bench/scale.py                                  # 10/100, 100/1,000, 1,000/10,000
    python bench/scale.py --sizes 10x100 --decisions 2000 --rounds 1 --json
"""

import argparse
import asyncio
import gc
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from broker.scheduling.elastic import ElasticCapacity
from broker.scheduling.ledger import Ledger
from broker.scheduling.placement import Placement, PlacementRules
from broker.scheduling.scheduler import Scheduler
from broker.settings import Settings
from schemas.task import TaskMessage
from workers.cluster import NodeInfo
from workers.pool import ActorInfo, PoolSpec
from workers.resources import ResourceVector

MEMORY_MARK = "swarm_memory_node"
# Each pool's share of the actors, the node that hosts them, and the actor's shape.
POOLS: dict[str, tuple[float, ResourceVector, ResourceVector]] = {
    #          share  node total                                  actor shape
    "cpu": (0.6, ResourceVector(64, 0, 262_144), ResourceVector(4, 0, 0)),
    "gpu": (0.3, ResourceVector(64, 16, 524_288), ResourceVector(2, 1, 0)),
    "memory": (0.1, ResourceVector(64, 0, 1_048_576), ResourceVector(2, 0, 16_384)),
}
MAX_CONCURRENCY = 64
QUEUES = ("training", "inference", "data_processing")


@dataclass
class Timings:
    """Seconds spent in each call, over the timed part of a round."""

    place: float = 0.0
    acquire: float = 0.0
    release: float = 0.0
    reap: float = 0.0

    @property
    def total(self) -> float:
        return self.place + self.acquire + self.release + self.reap


@dataclass
class Cluster:
    ledger: Ledger
    scheduler: Scheduler
    rules: PlacementRules
    running: dict[str, PoolSpec]
    capacity: ElasticCapacity
    nodes: list[NodeInfo] = field(default_factory=list)


def settings() -> Settings:
    # Every setting the rules read, so SWARM_* variables cannot change the bench.
    return Settings(
        gpu_task_types=["training", "inference"],
        gpu_defaults={"training": 1.0, "inference": 0.25, "data_processing": 1.0},
        memory_task_threshold_mb=2048,
        defaults_training={"cpus": 1.0, "gpus": 0.0, "memory_mb": 0},
        defaults_inference={"cpus": 0.05, "gpus": 0.0, "memory_mb": 0},
        defaults_data_processing={"cpus": 1.0, "gpus": 0.0, "memory_mb": 0},
    )


def build(nodes: int, actors: int) -> Cluster:
    """`nodes` nodes and `actors` actors, split between the pools by their share."""
    ledger = Ledger()
    running: dict[str, PoolSpec] = {}
    infos: list[ActorInfo] = []
    node_infos: list[NodeInfo] = []
    for name, (share, total, shape) in POOLS.items():
        pool_nodes = max(1, round(nodes * share))
        pool_actors = max(1, round(actors * share))
        custom = {MEMORY_MARK: 1.0} if name == "memory" else {}
        ids = [f"{name}-node-{i}" for i in range(pool_nodes)]
        node_infos += [NodeInfo(i, True, "10.0.0.1", total, dict(custom)) for i in ids]
        running[name] = PoolSpec(name, 0, pool_actors, shape, MAX_CONCURRENCY)
        infos += [
            ActorInfo(f"{name}-{i}", name, ids[i % pool_nodes], shape, MAX_CONCURRENCY)
            for i in range(pool_actors)
        ]
    ledger.set_nodes(node_infos)
    for info in infos:
        ledger.add_actor(info)
    return Cluster(
        ledger,
        Scheduler(ledger),
        PlacementRules(settings()),
        running,
        ElasticCapacity(ledger),
        node_infos,
    )


def task_mix(rng: random.Random, per_queue: int = 256) -> dict[str, list[TaskMessage]]:
    """Tasks of each queue: GPU training; inference on the GPU pool, a quarter of it pinned to
    the CPU pool; data processing on the CPU pool, a fifth of it large enough for the memory
    pool. A fifth of all tasks carry a priority."""

    def one(queue: str, i: int) -> TaskMessage:
        body: dict[str, Any] = {"v": 1, "id": f"{queue}-{i}", "type": queue, "handler": "echo"}
        if queue == "inference" and rng.random() < 0.25:
            body.update(pool="cpu", resources={"cpus": 0.25})
        if queue == "data_processing" and rng.random() < 0.2:
            body["resources"] = {"memory_mb": 4096}
        if rng.random() < 0.2:
            body["priority"] = rng.randint(1, 9)
        return TaskMessage.model_validate(body)

    return {queue: [one(queue, i) for i in range(per_queue)] for queue in QUEUES}


Acquiring = Coroutine[Any, Any, ActorInfo]


@dataclass
class Driver:
    """Steps the scheduler's coroutines by hand: an acquire that has to wait yields its
    future; once a release has placed it, one more step returns the actor."""

    cluster: Cluster
    rng: random.Random
    waiting_cap: int
    timings: Timings = field(default_factory=Timings)
    running: list[tuple[str, ActorInfo, ResourceVector]] = field(default_factory=list)
    waiting: dict[str, list[tuple[Any, Acquiring, str, ResourceVector]]] = field(
        default_factory=dict
    )
    released: int = 0
    _next: dict[str, int] = field(default_factory=dict)

    def arrive(self, queue: str, task: TaskMessage) -> None:
        c = self.cluster
        t0 = time.perf_counter()
        placement = c.rules.place(task, c.running, c.capacity)
        t1 = time.perf_counter()
        assert isinstance(placement, Placement), placement
        acquiring = c.scheduler.acquire(
            placement.pool, placement.request, task.priority or 0, queue
        )
        try:
            future = acquiring.send(None)
        except StopIteration as placed:
            t2 = time.perf_counter()
            self.running.append((placement.pool, placed.value, placement.request))
        else:
            t2 = time.perf_counter()
            entry = (future, acquiring, placement.pool, placement.request)
            self.waiting.setdefault(placement.pool, []).append(entry)
        self.timings.place += t1 - t0
        self.timings.acquire += t2 - t1

    def finish_one(self) -> None:
        index = self.rng.randrange(len(self.running))
        self.running[index], self.running[-1] = self.running[-1], self.running[index]
        pool, actor, request = self.running.pop()
        c = self.cluster
        t0 = time.perf_counter()
        c.scheduler.release(pool, actor, request)
        t1 = time.perf_counter()
        c.ledger.drained()
        t2 = time.perf_counter()
        self.timings.release += t1 - t0
        self.timings.reap += t2 - t1
        self.released += 1
        self._resume(pool)

    def _resume(self, pool: str) -> None:
        """One more step for each wait the release placed: it returns the actor."""
        entries = self.waiting.get(pool, [])
        kept = []
        for entry in entries:
            future, acquiring, _, request = entry
            if not future.done():
                kept.append(entry)
                continue
            t0 = time.perf_counter()
            try:
                acquiring.send(None)
            except StopIteration as placed:
                self.timings.acquire += time.perf_counter() - t0
                self.running.append((pool, placed.value, request))
            else:  # pragma: no cover - a placed wait returns at once
                raise AssertionError("a placed wait did not return")
        self.waiting[pool] = kept

    def arrivals(self, tasks: dict[str, list[TaskMessage]], most: int) -> None:
        """Up to `most` tasks, round robin over the queues whose consumer is not paused."""
        for _ in range(most):
            open_queues = [
                q for q in QUEUES if self.cluster.scheduler.waiting_by_tag(q) < self.waiting_cap
            ]
            if not open_queues:
                return
            queue = self.rng.choice(open_queues)
            n = self._next.get(queue, 0)
            self._next[queue] = n + 1
            self.arrive(queue, tasks[queue][n % len(tasks[queue])])


async def one_round(
    nodes: int, actors: int, decisions: int, waiting: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    cluster = build(nodes, actors)
    tasks = task_mix(rng)
    driver = Driver(cluster, rng, waiting)
    # Fill the cluster and the queues (not timed): then every finish wakes waiters.
    while any(cluster.scheduler.waiting_by_tag(q) < waiting for q in QUEUES):
        before = len(driver.running)
        driver.arrivals(tasks, 64)
        if len(driver.running) == before and not any(driver.waiting.values()):
            break
    driver.timings = Timings()
    driver.released = 0
    gc.collect()
    start = time.perf_counter()
    while driver.released < decisions:
        driver.finish_one()
        driver.arrivals(tasks, 2)  # faster than they finish: the queues stay full
    wall_s = time.perf_counter() - start
    sizing_ms = sizing_pass(cluster)
    timed = driver.timings
    return {
        "decisions": driver.released,
        "us_per_decision": timed.total / driver.released * 1e6,
        "us": {
            name: getattr(timed, name) / driver.released * 1e6
            for name in ("place", "acquire", "release", "reap")
        },
        "wall_s": wall_s,
        "waiting_at_end": {q: cluster.scheduler.waiting_by_tag(q) for q in QUEUES},
        "running_at_end": len(driver.running),
        "sizing_pass_ms": sizing_ms,
    }


def sizing_pass(cluster: Cluster) -> float:
    """Milliseconds of one pass of the pools' sizing loop over the ledger (PoolSet._size and
    refresh_nodes): room for one more actor and idle actors, per pool, and the node table."""
    t0 = time.perf_counter()
    cluster.ledger.set_nodes(cluster.nodes)
    for spec in cluster.running.values():
        cluster.ledger.room_for_actor(spec.shape, spec.custom_resources)
        cluster.ledger.idle_actors(spec.name, 60.0)
    return (time.perf_counter() - t0) * 1e3


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        nodes, _, actors = part.strip().partition("x")
        sizes.append((int(nodes), int(actors)))
    return sizes


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for nodes, actors in parse_sizes(args.sizes):
        rounds = [
            asyncio.run(one_round(nodes, actors, args.decisions, args.waiting, args.seed + r))
            for r in range(args.rounds)
        ]
        per = [r["us_per_decision"] for r in rounds]
        results.append(
            {
                "nodes": nodes,
                "actors": actors,
                "decisions": sum(r["decisions"] for r in rounds),
                "us_per_decision": statistics.median(per),
                "us_min": min(per),
                "us_max": max(per),
                "us_by_call": {
                    name: statistics.median(r["us"][name] for r in rounds)
                    for name in ("place", "acquire", "release", "reap")
                },
                "sizing_pass_ms": statistics.median(r["sizing_pass_ms"] for r in rounds),
                "rounds": rounds,
            }
        )
    first = results[0]
    for row in results:
        row["growth"] = row["us_per_decision"] / first["us_per_decision"]
        # What growing with the logarithm of the actor count would give at this size.
        row["log_growth"] = math.log(row["actors"]) / math.log(first["actors"])
    return {
        "meta": {
            "decisions_per_round": args.decisions,
            "rounds": args.rounds,
            "waiting_per_queue": args.waiting,
            "python": sys.version.split()[0],
        },
        "results": results,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        "nodes   actors  decisions  us/decision (min..max)   place acquire release  reap"
        "  growth  log-growth  sizing pass",
    ]
    for row in report["results"]:
        by = row["us_by_call"]
        lines.append(
            f"{row['nodes']:>5} {row['actors']:>8} {row['decisions']:>10} "
            f"{row['us_per_decision']:>8.1f} ({row['us_min']:.1f}..{row['us_max']:.1f})"
            f"{'':>4}{by['place']:>6.1f} {by['acquire']:>7.1f} {by['release']:>7.1f} "
            f"{by['reap']:>5.1f}  {row['growth']:>5.2f}x {row['log_growth']:>10.2f}x "
            f"{row['sizing_pass_ms']:>9.2f} ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10x100,100x1000,1000x10000", help="NODESxACTORS,...")
    parser.add_argument("--decisions", type=int, default=20_000, help="timed per round")
    parser.add_argument("--rounds", type=int, default=3, help="the median is reported")
    parser.add_argument("--waiting", type=int, default=64, help="waiting tasks per queue")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    report = measure(args)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
