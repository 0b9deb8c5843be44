"""The task message: what a producer publishes to `swarm.tasks`."""

from typing import Annotated, Any, Literal, TypeAlias

from pydantic import Field

from schemas.base import ProtocolVersion, WireModel

TaskType: TypeAlias = Literal["training", "inference", "data_processing"]
PoolName: TypeAlias = Literal["gpu", "cpu", "memory"]

NonNegative = Annotated[float, Field(ge=0)]


class Resources(WireModel):
    """What one run needs. A missing key takes the per-type default from configuration."""

    cpus: NonNegative | None = None
    gpus: NonNegative | None = None
    memory_mb: Annotated[int, Field(ge=0)] | None = None


class TaskMessage(WireModel):
    """The body of a task message, version 1."""

    v: ProtocolVersion
    id: Annotated[str, Field(min_length=1, max_length=128)]
    type: TaskType
    handler: Annotated[str, Field(min_length=1, max_length=256)]
    args: Any = None
    resources: Resources | None = None
    pool: PoolName | None = None
    # None when absent (or nil, which counts as absent): the scheduler reads it as 0.
    priority: Annotated[int, Field(ge=0, le=9)] | None = None
    deadline: float | None = None
    timeout_s: Annotated[float, Field(gt=0)] | None = None
    max_retries: Annotated[int, Field(ge=0, le=20)] | None = None
