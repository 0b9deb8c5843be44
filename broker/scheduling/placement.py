"""Placement rules: which pool a task goes to, and what it asks of that pool.

1. The message's `pool`, when given.
2. `gpu` when the task asks for GPUs.
3. `gpu` for the GPU task types (training and inference by default) while the GPU pool runs;
   such a task that names no GPUs takes its type's GPU share (`SWARM_GPU_DEFAULTS`).
4. `memory` when the task asks for at least `SWARM_MEMORY_TASK_THRESHOLD_MB` and the memory
   pool runs.
5. `cpu` otherwise.

A pool that does not run, or whose actors are too small for the request, is `unsatisfiable`;
so is a request no alive node could ever hold (nor, on a cluster with an autoscaler, any node
type it can add: broker/scheduling/elastic.py). Plain logic: no Ray, no AMQP.
"""

from dataclasses import dataclass

from broker.errors import Rejection
from broker.scheduling.elastic import Capacity
from broker.settings import Settings
from schemas.task import TaskMessage
from workers.pool import PoolSpec
from workers.resources import ResourceVector

_SHAPE_SETTINGS = {
    "cpu": "SWARM_CPU_ACTOR_CPUS",
    "gpu": "SWARM_GPU_ACTOR_CPUS or SWARM_GPU_ACTOR_GPUS",
    "memory": "SWARM_MEMORY_ACTOR_CPUS or SWARM_MEMORY_ACTOR_MEMORY_MB",
}


@dataclass(frozen=True)
class Placement:
    pool: str
    request: ResourceVector


class PlacementRules:
    def __init__(self, settings: Settings) -> None:
        self._defaults = {
            t: settings.task_defaults(t) for t in ("training", "inference", "data_processing")
        }
        self._gpu_types = frozenset(settings.gpu_task_types)
        self._gpu_defaults = dict(settings.gpu_defaults)
        self._memory_threshold_mb = settings.memory_task_threshold_mb

    def place(
        self, task: TaskMessage, running: dict[str, PoolSpec], capacity: Capacity
    ) -> Placement | Rejection:
        given = task.resources
        default = self._defaults[task.type]
        request = ResourceVector(
            cpus=default.cpus if given is None or given.cpus is None else given.cpus,
            gpus=default.gpus if given is None or given.gpus is None else given.gpus,
            memory_mb=(
                default.memory_mb if given is None or given.memory_mb is None else given.memory_mb
            ),
        )
        names_gpus = given is not None and given.gpus is not None
        if task.pool is not None:
            pool = task.pool
        elif request.gpus > 0 or (task.type in self._gpu_types and "gpu" in running):
            pool = "gpu"
        elif request.memory_mb >= self._memory_threshold_mb and "memory" in running:
            pool = "memory"
        else:
            pool = "cpu"
        # New vectors, not dataclasses.replace: this runs for every task, and replace costs
        # as much as the rest of the rules together.
        if pool == "gpu" and not names_gpus and request.gpus == 0:
            request = ResourceVector(
                request.cpus, self._gpu_defaults.get(task.type, 0.0), request.memory_mb
            )
        if not capacity.could_ever_fit(request):
            return Rejection(
                "unsatisfiable",
                f"no node of the cluster can ever hold {request.as_dict()}; "
                f"the largest node has {capacity.largest_node().as_dict()}",
            )
        spec = running.get(pool)
        if spec is not None and spec.shape.memory_mb == 0 and request.memory_mb:
            # Only memory actors reserve memory from Ray; elsewhere memory_mb steers routing
            # (above) but is not a share of the actor that the ledger could account.
            request = ResourceVector(request.cpus, request.gpus, 0)
        return self._check(pool, request, running)

    def _check(
        self, pool: str, request: ResourceVector, running: dict[str, PoolSpec]
    ) -> Placement | Rejection:
        spec = running.get(pool)
        if spec is None:
            return Rejection(
                "unsatisfiable",
                f"the {pool!r} pool is not running: no node of the cluster can hold one of its "
                f"actors (running pools: {', '.join(sorted(running)) or 'none'})",
            )
        if not request.fits_in(spec.shape):
            return Rejection(
                "unsatisfiable",
                f"a {pool!r} actor reserves {spec.shape.as_dict()}, less than the "
                f"{request.as_dict()} asked; raise {_SHAPE_SETTINGS[pool]} to take it",
            )
        return Placement(pool, request)
