"""Several runs for one actor in one Ray call.

A Ray call costs more CPU than a task's whole AMQP round trip, so under load one call per
task caps throughput. Here, at most `MAX_CALLS_IN_FLIGHT` calls per actor are outstanding;
runs submitted meanwhile queue and leave together, as one `run_many` call, when a call
returns. Unloaded, a run leaves at once as a plain `run`: nothing waits for company. Only
inline handlers (workers/registry.py: sync, `blocking=False`), which return at once, and
batch handlers, whose runs are meant to wait for each other, are coalesced: no result is held
back by a slow neighbour. There is one coalescer per actor and handler.
"""

import asyncio
from typing import Any

from workers.outcome import RunOutcome

Call = tuple[str, str, Any, float | None]

MAX_CALLS_IN_FLIGHT = 1


class CallCoalescer:
    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._calls: list[Call] = []
        self._waiters: list[asyncio.Future[RunOutcome]] = []
        self._in_flight = 0
        self._flush_scheduled = False
        self.calls_sent = 0  # Ray calls made, for tests and metrics

    def submit(self, call: Call) -> "asyncio.Future[RunOutcome]":
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[RunOutcome] = loop.create_future()
        self._calls.append(call)
        self._waiters.append(waiter)
        if self._in_flight < MAX_CALLS_IN_FLIGHT and not self._flush_scheduled:
            # The next iteration, so that runs submitted in this one leave with it.
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return waiter

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending = [
            (call, waiter)
            for call, waiter in zip(self._calls, self._waiters, strict=True)
            if not waiter.done()  # a caller cancelled while it waited here
        ]
        self._calls, self._waiters = [], []
        if not pending:
            return
        calls = [call for call, _ in pending]
        waiters = [waiter for _, waiter in pending]
        try:
            if len(calls) == 1:
                ref = self._handle.run.remote(*calls[0])
            else:
                ref = self._handle.run_many.remote(calls)
            future = asyncio.wrap_future(ref.future())
        except Exception as exc:
            # The call never left (a killed actor's handle, a value Ray cannot serialise):
            # counted in flight, it would hold this actor's and handler's runs forever.
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        self._in_flight += 1
        self.calls_sent += 1
        future.add_done_callback(lambda done: self._returned(done, waiters))

    def _returned(
        self, done: "asyncio.Future[Any]", waiters: list[asyncio.Future[RunOutcome]]
    ) -> None:
        self._in_flight -= 1
        if self._calls:
            self._flush()
        _deliver(done, waiters)


def _deliver(done: "asyncio.Future[Any]", waiters: list["asyncio.Future[RunOutcome]"]) -> None:
    """Each caller its own outcome, or the call's error (an actor lost fails them all)."""
    error: BaseException | None = asyncio.CancelledError() if done.cancelled() else done.exception()
    if error is None:
        result = done.result()
        outcomes = result if isinstance(result, list) else [result]
    for index, waiter in enumerate(waiters):
        if waiter.done():
            continue  # its caller was cancelled
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(outcomes[index])
