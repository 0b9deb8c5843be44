"""A typed pool of Ray worker actors, called asynchronously (no blocking `ray.get`)."""

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers.actor import WorkerActor
from workers.coalescing import CallCoalescer
from workers.errors import PoolStartError, WorkerLost
from workers.outcome import TRACEBACK_MAX_CHARS, RunOutcome
from workers.resources import ResourceVector

_BYTES_PER_MB = 1024 * 1024


@dataclass(frozen=True)
class PoolSpec:
    """How a pool's actors are shaped. `shape` is what each actor reserves from Ray."""

    name: str
    min_size: int
    max_size: int
    shape: ResourceVector
    max_concurrency: int = 64
    custom_resources: dict[str, float] = field(default_factory=dict)
    start_timeout_s: float = 60.0


@dataclass(frozen=True)
class ActorInfo:
    key: str
    pool: str
    node_id: str
    shape: ResourceVector
    max_concurrency: int


class RayActorPool:
    """Owns its actors. Actors are never restarted by Ray (`max_restarts=0`): a lost actor is
    replaced by a fresh one, so a retry lands on a healthy actor, not on the one that died."""

    def __init__(
        self, spec: PoolSpec, handler_modules: list[str], env: dict[str, str] | None = None
    ) -> None:
        self.spec = spec
        self._handler_modules = list(handler_modules)
        self._env = dict(env or {})
        self._handles: dict[str, Any] = {}
        self._infos: dict[str, ActorInfo] = {}
        self._serial = itertools.count()
        self._coalescers: dict[tuple[str, str], CallCoalescer] = {}

    @property
    def actors(self) -> list[ActorInfo]:
        return list(self._infos.values())

    async def start(self) -> list[ActorInfo]:
        return list(await asyncio.gather(*(self.add_actor() for _ in range(self.spec.min_size))))

    async def add_actor(self) -> ActorInfo:
        import ray

        key = f"{self.spec.name}-{next(self._serial)}"
        shape = self.spec.shape
        options: dict[str, Any] = {
            "num_cpus": shape.cpus,
            "num_gpus": shape.gpus,
            "max_concurrency": self.spec.max_concurrency,
            "max_restarts": 0,
        }
        if shape.memory_mb:
            options["memory"] = shape.memory_mb * _BYTES_PER_MB
        if self.spec.custom_resources:
            options["resources"] = dict(self.spec.custom_resources)
        actor_class: Any = ray.remote(WorkerActor)  # Ray's stubs do not model actor handles
        handle: Any = actor_class.options(**options).remote(
            self.spec.name, self._handler_modules, self._env
        )
        try:
            described = await asyncio.wait_for(handle.describe.remote(), self.spec.start_timeout_s)
        except asyncio.TimeoutError as exc:
            ray.kill(handle)
            raise PoolStartError(
                f"pool {self.spec.name!r}: an actor reserving {shape.as_dict()} did not start "
                f"within {self.spec.start_timeout_s:g} s; no node has that much free. "
                "Lower the pool's size or shape, or add nodes."
            ) from exc
        except Exception as exc:
            raise PoolStartError(f"pool {self.spec.name!r}: actor failed to start: {exc}") from exc
        info = ActorInfo(
            key=key,
            pool=self.spec.name,
            node_id=described["node_id"],
            shape=shape,
            max_concurrency=self.spec.max_concurrency,
        )
        self._handles[key] = handle
        self._infos[key] = info
        return info

    async def run(
        self,
        key: str,
        handler: str,
        task_type: str,
        args: Any,
        timeout_s: float | None,
        *,
        task_id: str = "",
        attempt: int = 1,
        coalesce: bool = False,
    ) -> RunOutcome:
        """Run one task on the actor `key`. Raises WorkerLost if the actor dies under it.

        With `coalesce` (inline handlers, which return at once, and batch handlers, whose runs
        wait for each other anyway), the runs of one handler for one actor travel together in
        one Ray call (workers/coalescing.py): a Ray call costs more CPU than the whole AMQP
        round trip of a task, so under load this is the cheaper path by far.
        """
        import ray

        handle = self._handle(key)
        call = (handler, task_type, args, timeout_s)
        ref = None
        try:
            if coalesce:
                # One per actor and handler: a batch in flight never holds inline runs back.
                coalescer = self._coalescers.get((key, handler))
                if coalescer is None:
                    coalescer = self._coalescers[(key, handler)] = CallCoalescer(handle)
                outcome: RunOutcome = await coalescer.submit(call)
            else:
                ref = handle.run.remote(*call, task_id, attempt)
                outcome = await ref
        except asyncio.CancelledError:
            # Our caller gave up (a cancel, or shutdown): stop the run in the actor too. An
            # async handler gets CancelledError; a sync one's thread cannot be interrupted
            # (nor can an inline one, so a coalesced call is left to finish for the others).
            if ref is not None:
                ray.cancel(ref)
            raise
        except Exception as exc:
            return _failed_call(key, exc)
        return outcome

    async def run_streaming(
        self,
        key: str,
        handler: str,
        task_type: str,
        args: Any,
        timeout_s: float | None,
        task_id: str,
        attempt: int,
        on_progress: Callable[[bytes, int], None],
    ) -> RunOutcome:
        """`run`, handing each progress report (msgpack bytes) to `on_progress` as it comes,
        with how many reports the actor dropped just before it (WorkerActor.run_streaming)."""
        import ray

        handle = self._handle(key)
        stream = handle.run_streaming.options(num_returns="streaming").remote(
            handler, task_type, args, timeout_s, task_id, attempt
        )
        try:
            async for ref in stream:
                item = await ref
                if isinstance(item, RunOutcome):
                    return item
                _, report, dropped = item
                on_progress(report, dropped)
        except asyncio.CancelledError:
            ray.cancel(stream)
            raise
        except Exception as exc:
            return _failed_call(key, exc)
        raise WorkerLost(key, "the actor's stream ended without an outcome")

    def _handle(self, key: str) -> Any:
        handle = self._handles.get(key)
        if handle is None:
            raise WorkerLost(key, "the actor was already removed from its pool")
        return handle

    def remove(self, key: str) -> ActorInfo | None:
        """Forget an actor (lost, or idle and retired) and make sure its process is gone."""
        import ray

        handle = self._handles.pop(key, None)
        info = self._infos.pop(key, None)
        for coalesced in [k for k in self._coalescers if k[0] == key]:
            del self._coalescers[coalesced]
        if handle is not None:
            ray.kill(handle, no_restart=True)
        return info

    def stop(self) -> None:
        for key in list(self._handles):
            self.remove(key)


def _failed_call(key: str, exc: Exception) -> RunOutcome:
    """A Ray call that raised: the actor died (WorkerLost, retried elsewhere), or the method
    itself raised, which only BaseExceptions (SystemExit, ...) do past WorkerActor.run."""
    import ray.exceptions

    if isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError):
        raise WorkerLost(key, type(exc).__name__) from exc
    if isinstance(exc, ray.exceptions.RayTaskError):
        return RunOutcome(
            ok=False,
            error_code="handler_error",
            error_message=str(exc.cause),
            traceback=str(exc)[-TRACEBACK_MAX_CHARS:],  # Ray's text holds the remote one
        )
    raise exc
