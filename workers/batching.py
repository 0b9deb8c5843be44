"""Dynamic batching inside an actor: concurrent runs of one batch handler become one call.

A handler declared with `batch_max` takes a list of args and returns a list of results, one
per item, in order; an exception in place of a result fails that item's task alone. Runs
that arrive within `batch_wait_s` of the first (or until `batch_max` are waiting) are handed
to it together, so a model answers many queued inference tasks with one GPU call; each
result still goes to its own task's reply.
"""

import asyncio
from typing import Any

from workers.context import ActorContext
from workers.registry import HandlerSpec


class Batcher:
    def __init__(self, spec: HandlerSpec, context: ActorContext) -> None:
        assert spec.batch_max is not None
        self._spec = spec
        # One call serves many tasks, so a batch handler's context is the actor's, not a task's.
        self._call_args: tuple[Any, ...] = (context,) if spec.wants_context else ()
        self._max = spec.batch_max
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._timer: asyncio.Handle | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, args: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((args, future))
        if len(self._pending) >= self._max:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                self._spec.batch_wait_s, self._flush
            )
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending[: self._max], self._pending[self._max :]
        if self._pending:  # more than one batch arrived at once: the rest go next
            self._timer = asyncio.get_running_loop().call_soon(self._flush)
        if batch:
            task = asyncio.ensure_future(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[Any, "asyncio.Future[Any]"]]) -> None:
        items = [args for args, _ in batch]
        try:
            if self._spec.is_async:
                results = await self._spec.func(items, *self._call_args)
            else:
                results = await asyncio.to_thread(self._spec.func, items, *self._call_args)
            if not isinstance(results, list) or len(results) != len(items):
                raise TypeError(
                    f"batch handler {self._spec.name!r} must return a list of {len(items)} "
                    f"results, got {type(results).__name__}"
                )
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)  # this item failed; the others stand
            else:
                future.set_result(result)
