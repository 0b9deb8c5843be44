"""Tasks in progress in this daemon, by id: for cancels and for duplicates arriving meanwhile."""

import asyncio
from dataclasses import dataclass, field

from broker.tasks.delivery import Settlement


@dataclass
class ActiveTask:
    task_id: str
    worker: "asyncio.Task[object] | None"
    running: bool = False
    attempts: int = 0
    cancel_requested: bool = False
    settled: "asyncio.Future[None]" = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # Renewal copies of this task's message that reached us since the last renewal, and
    # those of before it: the next renewal acks the latter, the task's end settles both.
    copies: list[Settlement] = field(default_factory=list)
    renewed_copies: list[Settlement] = field(default_factory=list)


class ActiveTasks:
    def __init__(self) -> None:
        self._by_id: dict[str, ActiveTask] = {}

    def get(self, task_id: str) -> ActiveTask | None:
        return self._by_id.get(task_id)

    @property
    def count(self) -> int:
        """Tasks admitted and not yet settled (waiting, running or being answered)."""
        return len(self._by_id)

    def begin(self, task_id: str) -> ActiveTask:
        """Only once no entry for the id is left: TaskProcessor waits out the one in progress."""
        active = ActiveTask(task_id, asyncio.current_task())
        self._by_id[task_id] = active
        return active

    def end(self, active: ActiveTask) -> None:
        """The task's outcome is published (or failed to be): release whoever waits on it.
        By the entry, not the id: an entry that ended late (a second settle, a stray end)
        must not take away the entry of a later run of the same id."""
        if self._by_id.get(active.task_id) is active:
            del self._by_id[active.task_id]
        if not active.settled.done():
            active.settled.set_result(None)

    def cancel(self, task_id: str) -> str | None:
        """Stop a waiting or running task; returns the state it was in, or None if unknown."""
        active = self._by_id.get(task_id)
        if active is None:
            return None
        if active.worker is None:
            return "finishing"
        state = "running" if active.running else "waiting"
        if not active.cancel_requested:
            active.cancel_requested = True
            active.worker.cancel("cancelled by a control request")
        return state
