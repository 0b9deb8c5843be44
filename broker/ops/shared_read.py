"""One read for many concurrent callers: bounds the work a burst of requests can cause.

A caller gets the result of a read that started after it asked (never an older one), so it
sees every change made before its request. While one read runs, all callers arriving meanwhile
share the single next read; so however many ask at once, at most one read runs and one waits.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedRead(Generic[T]):
    def __init__(self, read: Callable[[], Awaitable[T]]) -> None:
        self._read = read
        self._running: asyncio.Task[T] | None = None
        self._next: asyncio.Task[T] | None = None

    async def __call__(self) -> T:
        if self._next is None:
            self._next = asyncio.create_task(self._run_after(self._running))
            # A read whose callers were all cancelled still ends; its error is not news.
            self._next.add_done_callback(_consume_error)
        # Shielded: a cancelled caller (a stopping refresher) leaves the read to the others,
        # instead of cancelling an AMQP call half way.
        return await asyncio.shield(self._next)

    async def _run_after(self, previous: asyncio.Task[T] | None) -> T:
        if previous is not None:
            await asyncio.wait([previous])
        # From here this read is running: later callers need the one after it.
        self._running, self._next = self._next, None
        return await self._read()


def _consume_error(task: "asyncio.Task[object]") -> None:
    if not task.cancelled():
        task.exception()
