"""Ray's side in memory: a PoolSet whose runs the test answers by hand.

`FakePools` has the surface TaskProcessor uses (broker/scheduling/pools.py): `running`, `run`,
`run_streaming`, `actor_lost`, `retire`, `reap`. It keeps the ledger as PoolSet does (a lost
actor leaves it, a retired one drains and is stopped once its last run ends), and adds a
fresh actor in place of one lost or stopped, as PoolSet's sizing loop would. Each run becomes a
`RunCall` the test answers (`succeed`, `fail`, `lose`), or is answered at once from a
script (`FakePools.answer`).

Handlers never run: the HandlerSpecs here only describe what kind of handler a task names
(async, sync on a thread, inline, reporting progress), which is all the processor reads.
"""

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from broker.scheduling.scheduler import Scheduler
from schemas.codec import encode
from schemas.topology import TASK_TYPES
from workers.errors import WorkerLost
from workers.outcome import RunOutcome
from workers.pool import ActorInfo, PoolSpec
from workers.registry import HandlerSpec
from workers.resources import ResourceVector

from .sync import Changes

# Four default-sized (1 CPU) tasks at once per actor.
CPU_POOL = PoolSpec("cpu", min_size=1, max_size=4, shape=ResourceVector(cpus=4.0))


def _not_run_here(args: Any) -> Any:
    raise AssertionError("FakePools never calls a handler")


def spec(name: str, **kind: Any) -> HandlerSpec:
    return HandlerSpec(name=name, func=_not_run_here, task_types=frozenset(TASK_TYPES), **kind)


# The kinds of handler the processor tells apart.
ASYNC = spec("async_handler", is_async=True)
BLOCKING_SYNC = spec("blocking_sync", is_async=False, blocking=True)
INLINE_SYNC = spec("inline_sync", is_async=False, blocking=False)
REPORTS_PROGRESS = spec("reports_progress", is_async=True, wants_context=True)
HANDLERS = (ASYNC, BLOCKING_SYNC, INLINE_SYNC, REPORTS_PROGRESS)


def ok(value: Any = None, run_ms: float = 1.0) -> RunOutcome:
    return RunOutcome(ok=True, payload=encode(value), run_ms=run_ms)


def failed(
    code: str = "handler_error", message: str = "it failed", retry_delay_s: float | None = None
) -> RunOutcome:
    return RunOutcome(
        ok=False, error_code=code, error_message=message, run_ms=1.0, retry_delay_s=retry_delay_s
    )


@dataclass
class RunCall:
    """One run the processor asked for; the test answers it through `answer`."""

    actor: ActorInfo
    handler: str
    task_type: str
    args: Any
    timeout_s: float | None
    task_id: str
    attempt: int
    coalesce: bool
    streaming: bool
    on_progress: Any = None  # Callable[[bytes], None] for a streamed run
    answer: "asyncio.Future[RunOutcome]" = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def succeed(self, value: Any = None) -> None:
        self.answer.set_result(ok(value))

    def fail(
        self,
        code: str = "handler_error",
        message: str = "it failed",
        retry_delay_s: float | None = None,
    ) -> None:
        self.answer.set_result(failed(code, message, retry_delay_s))

    def lose(self, reason: str = "its process died") -> None:
        self.answer.set_exception(WorkerLost(self.actor.key, reason))

    def report(self, progress: Any) -> None:
        """What a handler's `ctx.progress(...)` sends while the run goes on."""
        assert self.on_progress is not None, "not a streamed run"
        self.on_progress(encode(progress))

    @property
    def cancelled(self) -> bool:
        """The processor stopped waiting for it (a cancel, a shutdown)."""
        return self.answer.cancelled()


class FakePools:
    """PoolSet's surface, on the scheduler's real ledger. See the module docstring."""

    def __init__(
        self,
        scheduler: Scheduler,
        changes: Changes,
        specs: tuple[PoolSpec, ...] = (CPU_POOL,),
        actors: int = 1,
        node_id: str = "n1",
    ) -> None:
        self._scheduler = scheduler
        self._ledger = scheduler.ledger
        self._changes = changes
        self._node_id = node_id
        self._serial = itertools.count()
        self.running: dict[str, PoolSpec] = {s.name: s for s in specs}
        self.capacity = self._ledger  # a fixed cluster: placement asks the nodes present
        self.calls: list[RunCall] = []
        self._unseen: deque[RunCall] = deque()
        self._script: deque[RunOutcome | BaseException] = deque()
        self.lost: list[str] = []
        self.retired: list[str] = []
        self.stopped: list[str] = []
        # reap() is called once at the end of every run attempt, right after its room was
        # given back to the scheduler: a count of attempts that have ended.
        self.runs_ended = 0
        for pool in self.running:
            for _ in range(actors):
                self.add_actor(pool)

    def add_actor(self, pool: str) -> ActorInfo:
        spec = self.running[pool]
        info = ActorInfo(
            f"{pool}-{next(self._serial)}", pool, self._node_id, spec.shape, spec.max_concurrency
        )
        self._ledger.add_actor(info)
        self._scheduler.wake(pool)
        self._changes.notify()
        return info

    def answer(self, *outcomes: RunOutcome | BaseException) -> None:
        """Answer the next runs, in order, with these (an exception is raised by the run)."""
        self._script.extend(outcomes)

    async def next_call(self) -> RunCall:
        """The next run not yet handed to the test, once it is asked for."""
        await self._changes.until(lambda: bool(self._unseen), "a run to be asked for")
        return self._unseen.popleft()

    # -- PoolSet's surface -------------------------------------------------------------------
    async def run(
        self,
        actor: ActorInfo,
        handler: str,
        task_type: str,
        args: object,
        timeout_s: float | None,
        *,
        task_id: str = "",
        attempt: int = 1,
        coalesce: bool = False,
    ) -> RunOutcome:
        call = RunCall(
            actor, handler, task_type, args, timeout_s, task_id, attempt, coalesce, False
        )
        return await self._called(call)

    async def run_streaming(
        self,
        actor: ActorInfo,
        handler: str,
        task_type: str,
        args: object,
        timeout_s: float | None,
        task_id: str,
        attempt: int,
        on_progress: Any,
    ) -> RunOutcome:
        call = RunCall(
            actor, handler, task_type, args, timeout_s, task_id, attempt, False, True, on_progress
        )
        return await self._called(call)

    async def _called(self, call: RunCall) -> RunOutcome:
        self.calls.append(call)
        if self._script:
            scripted = self._script.popleft()
            if isinstance(scripted, BaseException):
                call.answer.set_exception(scripted)
            else:
                call.answer.set_result(scripted)
        else:
            self._unseen.append(call)
        self._changes.notify()
        try:
            return await call.answer
        finally:
            self._changes.notify()

    def actor_lost(self, actor: ActorInfo) -> None:
        if actor.key not in self._ledger.actors:
            return
        self._ledger.remove_actor(actor.key)
        self.lost.append(actor.key)
        self.add_actor(actor.pool)  # PoolSet's sizing loop replaces it

    def retire(self, actor: ActorInfo) -> None:
        self._ledger.drain(actor.key)
        self.retired.append(actor.key)
        self._stop_drained()

    def reap(self) -> None:
        self.runs_ended += 1
        self._stop_drained()

    def _stop_drained(self) -> None:
        """Stop retired actors whose last run ended; a fresh one takes each one's place."""
        for key in self._ledger.drained():
            pool = self._ledger.actors[key].info.pool
            self._ledger.remove_actor(key)
            self.stopped.append(key)
            self.add_actor(pool)
        self._changes.notify()
