"""The worker actor: one process of a pool, running registered handlers by name."""

import asyncio
import time
from typing import Any

from schemas.codec import encode
from workers.batching import Batcher
from workers.outcome import RunOutcome
from workers.registry import HandlerSpec, load_handlers
from workers.signals import Retry


class WorkerActor:
    """Runs handlers. Async handlers run on the actor's event loop; sync ones on a thread
    (unless declared `blocking=False`), so one slow sync handler never stalls the others."""

    def __init__(self, pool: str, handler_modules: list[str]) -> None:
        import ray  # only inside the actor process

        self._pool = pool
        self._registry = load_handlers(handler_modules)
        self._node_id: str = ray.get_runtime_context().get_node_id()
        self._batchers: dict[str, Batcher] = {}

    def describe(self) -> dict[str, Any]:
        """Where the actor runs and what it can do; also serves as the readiness probe."""
        return {"node_id": self._node_id, "handlers": self._registry.names()}

    async def run(
        self, handler: str, task_type: str, args: Any, timeout_s: float | None
    ) -> RunOutcome:
        spec = self._registry.get(handler)
        if spec is None or task_type not in spec.task_types:
            return RunOutcome(
                ok=False,
                error_code="unknown_handler",
                error_message=f"handler {handler!r} is not registered for {task_type!r} here",
            )
        started = time.perf_counter()
        try:
            value = await asyncio.wait_for(self._call(spec, args), timeout_s)
        except Retry as signal:
            return RunOutcome(
                ok=False,
                error_code="handler_error",
                error_message=f"asked to retry: {signal}",
                run_ms=_ms_since(started),
                retry_delay_s=signal.delay_s,
            )
        except asyncio.TimeoutError:
            return RunOutcome(
                ok=False,
                error_code="timeout",
                error_message=f"run exceeded its time limit of {timeout_s:g} s",
                run_ms=_ms_since(started),
            )
        except Exception as exc:
            return RunOutcome(
                ok=False,
                error_code="handler_error",
                error_message=f"{type(exc).__name__}: {exc}",
                run_ms=_ms_since(started),
            )
        run_ms = _ms_since(started)
        try:
            payload = encode(value)
        except Exception as exc:
            return RunOutcome(
                ok=False,
                error_code="handler_error",
                error_message=f"result is not msgpack-serializable: {type(exc).__name__}: {exc}",
                run_ms=run_ms,
            )
        return RunOutcome(ok=True, payload=payload, run_ms=run_ms)

    async def run_many(self, calls: list[tuple[str, str, Any, float | None]]) -> list[RunOutcome]:
        """Several runs in one call (workers/coalescing.py), one after another: only inline
        handlers are coalesced, and they return at once."""
        return [await self.run(*call) for call in calls]

    async def _call(self, spec: HandlerSpec, args: Any) -> Any:
        if spec.batch_max is not None:
            batcher = self._batchers.get(spec.name)
            if batcher is None:
                batcher = self._batchers[spec.name] = Batcher(spec)
            return await batcher.submit(args)
        if spec.is_async:
            return await spec.func(args)
        if not spec.blocking:
            return spec.func(args)
        return await asyncio.to_thread(spec.func, args)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
