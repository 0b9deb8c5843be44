"""What a handler may know of where and as what it runs: the handler SDK's context objects.

A handler that takes a second parameter gets one of these. `ActorContext` is the actor's view
(the devices Ray gave it, the node, the state its `setup` built once); `TaskContext` adds the
task being run and a way to report progress while it runs.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ProgressSink = Callable[[Any], None]


def no_progress(data: Any) -> None:
    """Nobody asked for progress on this task: reports go nowhere, at no cost."""


@dataclass(frozen=True)
class ActorContext:
    pool: str
    node_id: str
    # Accelerator ids Ray assigned to this actor ("0", "1"; what CUDA_VISIBLE_DEVICES holds).
    gpu_ids: tuple[str, ...] = ()
    # What the handler's `setup` returned, built once per actor (None without a setup).
    state: Any = None

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpu_ids)

    @property
    def device(self) -> str:
        """A torch-style device name: "cuda" when Ray gave this actor a GPU, else "cpu"."""
        return "cuda" if self.gpu_ids else "cpu"


@dataclass(frozen=True)
class TaskContext(ActorContext):
    task_id: str = ""
    task_type: str = ""
    attempt: int = 1
    _sink: ProgressSink = field(default=no_progress, repr=False)

    def progress(self, data: Any) -> None:
        """Report progress (any msgpack-able value, e.g. {"epoch": 3, "loss": 0.12}).

        Safe from a sync handler's thread and from an async handler. The daemon publishes it
        to the task's reply queue as a `progress` message when the producer asked for
        progress; otherwise it is dropped. Best effort: the final reply is what is guaranteed.
        """
        self._sink(data)
