"""workers.coalescing with a stand-in actor handle: who gets which outcome, when calls leave."""

import asyncio
import concurrent.futures
from typing import Any

import pytest

from workers.coalescing import CallCoalescer
from workers.outcome import RunOutcome


class FakeMethod:
    def __init__(self, calls: list[Any], results: list["concurrent.futures.Future[Any]"]) -> None:
        self._calls = calls
        self._results = results

    def remote(self, *args: Any) -> "FakeRef":
        self._calls.append(args)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._results.append(future)
        return FakeRef(future)


class FakeRef:
    def __init__(self, future: "concurrent.futures.Future[Any]") -> None:
        self._future = future

    def future(self) -> "concurrent.futures.Future[Any]":
        return self._future


class FakeHandle:
    """Records each Ray call; the test decides when and how each returns."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.results: list[concurrent.futures.Future[Any]] = []
        self.single: list[Any] = []
        self.many: list[Any] = []
        self.run = FakeMethod(self.single, self.results)
        self.run_many = FakeMethod(self.many, self.results)


def outcome(value: int) -> RunOutcome:
    return RunOutcome(ok=True, payload=bytes([value]))


def call(n: int) -> tuple[str, str, Any, float | None]:
    return ("echo", "inference", n, None)


async def test_a_lone_run_leaves_at_once_as_a_plain_call() -> None:
    handle = FakeHandle()
    waiter = CallCoalescer(handle).submit(call(1))
    await asyncio.sleep(0)  # one loop iteration: the flush
    assert handle.single == [call(1)] and handle.many == []
    handle.results[0].set_result(outcome(1))
    assert (await waiter).payload == bytes([1])


async def test_runs_queued_behind_a_call_in_flight_leave_together_in_order() -> None:
    handle = FakeHandle()
    coalescer = CallCoalescer(handle)
    first = coalescer.submit(call(0))
    await asyncio.sleep(0)
    later = [coalescer.submit(call(n)) for n in range(1, 6)]
    await asyncio.sleep(0)
    assert handle.many == [], "nothing more leaves while a call is in flight"
    handle.results[0].set_result(outcome(0))
    assert (await first).payload == bytes([0])
    assert handle.many == [([call(n) for n in range(1, 6)],)]
    handle.results[1].set_result([outcome(n) for n in range(1, 6)])
    assert [(await w).payload for w in later] == [bytes([n]) for n in range(1, 6)]
    assert coalescer.calls_sent == 2


async def test_a_failed_call_fails_every_run_it_carried() -> None:
    handle = FakeHandle()
    coalescer = CallCoalescer(handle)
    waiters = [coalescer.submit(call(n)) for n in range(3)]
    await asyncio.sleep(0)
    handle.results[0].set_exception(RuntimeError("actor died"))
    for waiter in waiters:
        with pytest.raises(RuntimeError, match="actor died"):
            await waiter


async def test_a_run_cancelled_while_queued_is_never_sent() -> None:
    handle = FakeHandle()
    coalescer = CallCoalescer(handle)
    first = coalescer.submit(call(0))
    await asyncio.sleep(0)
    kept = coalescer.submit(call(1))
    dropped = coalescer.submit(call(2))
    dropped.cancel()
    handle.results[0].set_result(outcome(0))
    await first  # its return sent what had queued behind it
    assert handle.single[-1] == call(1), "the cancelled run left the batch"
    handle.results[1].set_result(outcome(1))
    assert (await kept).payload == bytes([1])


async def test_a_caller_cancelled_in_flight_leaves_the_others_their_outcomes() -> None:
    handle = FakeHandle()
    coalescer = CallCoalescer(handle)
    waiters = [coalescer.submit(call(n)) for n in range(3)]
    await asyncio.sleep(0)
    waiters[1].cancel()
    handle.results[0].set_result([outcome(n) for n in range(3)])
    assert (await waiters[0]).payload == bytes([0])
    assert (await waiters[2]).payload == bytes([2])
