"""The worker actor: one process of a pool, running registered handlers by name."""

import asyncio
import dataclasses
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import pydantic

from workers.batching import Batcher
from workers.context import ActorContext, ProgressSink, TaskContext, no_progress
from workers.outcome import RunOutcome, bounded_traceback
from workers.registry import HandlerSpec, load_handlers
from workers.results import encode_result
from workers.setups import Setups
from workers.signals import Retry

# What `run_streaming` yields before its final RunOutcome: ("progress", msgpack bytes,
# reports dropped just before this one).
PROGRESS = "progress"
# Progress reports waiting in the actor to be streamed; past it the oldest are dropped.
MAX_PENDING_REPORTS = 64


class WorkerActor:
    """Runs handlers. Async handlers run on the actor's event loop; sync ones on a thread
    (unless declared `blocking=False`), so one slow sync handler never stalls the others."""

    def __init__(
        self, pool: str, handler_modules: list[str], env: dict[str, str] | None = None
    ) -> None:
        import ray  # only inside the actor process

        # The daemon's settings that handlers read (SWARM_MODEL_DIR), before they import.
        os.environ.update(env or {})
        self._pool = pool
        self._registry = load_handlers(handler_modules)
        context = ray.get_runtime_context()
        self._node_id: str = context.get_node_id()
        gpu_ids = context.get_accelerator_ids().get("GPU", [])
        self._actor = ActorContext(pool=pool, node_id=self._node_id, gpu_ids=tuple(gpu_ids))
        self._setups = Setups(self._actor)
        self._batchers: dict[str, Batcher] = {}

    def describe(self) -> dict[str, Any]:
        """Where the actor runs and what it can do; also serves as the readiness probe."""
        return {
            "node_id": self._node_id,
            "handlers": self._registry.names(),
            "gpu_ids": list(self._actor.gpu_ids),
        }

    async def run(
        self,
        handler: str,
        task_type: str,
        args: Any,
        timeout_s: float | None,
        task_id: str = "",
        attempt: int = 1,
        progress: ProgressSink | None = None,
    ) -> RunOutcome:
        spec = self._registry.get(handler)
        if spec is None or task_type not in spec.task_types:
            return RunOutcome(
                ok=False,
                error_code="unknown_handler",
                error_message=f"handler {handler!r} is not registered for {task_type!r} here",
            )
        if spec.args_model is not None:
            try:
                args = spec.args_model.model_validate(args)
            except pydantic.ValidationError as exc:
                return RunOutcome(
                    ok=False,
                    error_code="invalid",
                    error_message=f"args do not fit handler {handler!r}: {exc}",
                )
        started = time.perf_counter()
        try:
            value = await asyncio.wait_for(
                self._call(spec, args, task_type, task_id, attempt, progress), timeout_s
            )
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
                traceback=bounded_traceback(exc),
            )
        run_ms = _ms_since(started)
        try:
            payload = encode_result(value)
        except Exception as exc:
            return RunOutcome(
                ok=False,
                error_code="handler_error",
                error_message=f"result is not msgpack-serializable: {type(exc).__name__}: {exc}",
                run_ms=run_ms,
            )
        return RunOutcome(ok=True, payload=payload, run_ms=run_ms)

    async def run_streaming(
        self,
        handler: str,
        task_type: str,
        args: Any,
        timeout_s: float | None,
        task_id: str,
        attempt: int,
    ) -> AsyncIterator[Any]:
        """`run`, yielding the handler's progress reports ("progress", msgpack bytes, dropped)
        as they come, then the RunOutcome. Called with `num_returns="streaming"` for tasks
        whose producer asked for progress.

        At most MAX_PENDING_REPORTS reports wait here to be yielded: a handler that reports
        faster than they leave has its oldest pending ones dropped (progress is best effort,
        and the latest report says the most), and `dropped` counts those dropped since the
        report before, so the daemon's `seq` shows the gap."""
        pending: deque[bytes] = deque()
        dropped = 0
        arrived = asyncio.Event()
        loop = asyncio.get_running_loop()

        def keep(report: bytes) -> None:
            nonlocal dropped
            if len(pending) >= MAX_PENDING_REPORTS:
                pending.popleft()
                dropped += 1
            pending.append(report)
            arrived.set()

        def sink(data: Any) -> None:
            # Encoded here, in the reporting thread, so that a bad value fails the handler's
            # own call; kept through the loop, since sync handlers report from a thread.
            loop.call_soon_threadsafe(keep, encode_result(data))

        def take() -> tuple[str, bytes, int]:
            nonlocal dropped
            report, skipped, dropped = pending.popleft(), dropped, 0
            if not pending:
                arrived.clear()
            return (PROGRESS, report, skipped)

        run = asyncio.ensure_future(
            self.run(handler, task_type, args, timeout_s, task_id, attempt, sink)
        )
        try:
            while not run.done():
                waiting = asyncio.ensure_future(arrived.wait())
                await asyncio.wait({run, waiting}, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                if pending:
                    yield take()
            # Reports the thread queued through the loop before the run returned.
            await asyncio.sleep(0)
            while pending:
                yield take()
            yield run.result()
        finally:
            run.cancel()  # a no-op once done; stops the handler when the call was cancelled

    async def run_many(self, calls: list[tuple[str, str, Any, float | None]]) -> list[RunOutcome]:
        """Several runs of one handler in one call (workers/coalescing.py). Inline ones one
        after another (they return at once; no task per run); a batch handler's all at once,
        so that they reach its batcher together and run as one batch."""
        spec = self._registry.get(calls[0][0]) if calls else None
        if spec is not None and spec.batch_max is not None:
            return list(await asyncio.gather(*(self.run(*call) for call in calls)))
        return [await self.run(*call) for call in calls]

    async def _call(
        self,
        spec: HandlerSpec,
        args: Any,
        task_type: str,
        task_id: str,
        attempt: int,
        progress: ProgressSink | None,
    ) -> Any:
        state = await self._setups.state_for(spec)
        if spec.batch_max is not None:
            batcher = self._batchers.get(spec.name)
            if batcher is None:
                context = dataclasses.replace(self._actor, state=state)
                batcher = self._batchers[spec.name] = Batcher(spec, context)
            return await batcher.submit(args)
        call_args: tuple[Any, ...] = (args,)
        if spec.wants_context:
            actor = self._actor
            context = TaskContext(
                pool=actor.pool,
                node_id=actor.node_id,
                gpu_ids=actor.gpu_ids,
                state=state,
                task_id=task_id,
                task_type=task_type,
                attempt=attempt,
                _sink=progress or no_progress,
            )
            call_args = (args, context)
        if spec.is_async:
            return await spec.func(*call_args)
        if not spec.blocking:
            return spec.func(*call_args)
        return await asyncio.to_thread(spec.func, *call_args)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
