"""workers.coalescing when the Ray call cannot even be made (`.remote()` raises): every run of
that flush gets the error, and the actor's next runs are sent as if it had not happened."""

import asyncio
import concurrent.futures
from typing import Any

import pytest

from workers.coalescing import CallCoalescer
from workers.outcome import RunOutcome


class SendFailed(Exception):
    pass


class FlakyMethod:
    """`.remote()` raises for the first `failures` calls, then returns a ref the test ends."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent: list[tuple[Any, ...]] = []
        self.results: list[concurrent.futures.Future[Any]] = []

    def remote(self, *args: Any) -> "FakeRef":
        if self.failures:
            self.failures -= 1
            raise SendFailed("cannot serialise the arguments")
        self.sent.append(args)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.results.append(future)
        return FakeRef(future)


class FakeRef:
    def __init__(self, future: "concurrent.futures.Future[Any]") -> None:
        self._future = future

    def future(self) -> "concurrent.futures.Future[Any]":
        return self._future


class FlakyHandle:
    def __init__(self, failures: int) -> None:
        self.run = FlakyMethod(failures)
        self.run_many = FlakyMethod(failures)


def call(n: int) -> tuple[str, str, Any, float | None]:
    return ("echo", "inference", n, None)


async def test_a_call_that_cannot_be_sent_fails_its_run_and_the_next_run_is_sent() -> None:
    handle = FlakyHandle(failures=1)
    coalescer = CallCoalescer(handle)
    failed = coalescer.submit(call(1))
    with pytest.raises(SendFailed):
        await asyncio.wait_for(failed, 1.0)
    assert coalescer.calls_sent == 0
    later = coalescer.submit(call(2))
    await asyncio.sleep(0)
    assert handle.run.sent == [call(2)], "the failed send left a call counted in flight"
    handle.run.results[0].set_result(RunOutcome(ok=True, payload=b"\x02"))
    assert (await asyncio.wait_for(later, 1.0)).payload == b"\x02"


async def test_every_run_of_a_batch_that_cannot_be_sent_gets_the_error() -> None:
    handle = FlakyHandle(failures=0)
    coalescer = CallCoalescer(handle)
    first = coalescer.submit(call(0))
    await asyncio.sleep(0)
    handle.run_many.failures = 1  # the batch queued behind the first call fails to leave
    queued = [coalescer.submit(call(n)) for n in range(1, 4)]
    handle.run.results[0].set_result(RunOutcome(ok=True, payload=b"\x00"))
    assert (await asyncio.wait_for(first, 1.0)).payload == b"\x00"
    for waiter in queued:
        with pytest.raises(SendFailed):
            await asyncio.wait_for(waiter, 1.0)
    again = coalescer.submit(call(9))
    await asyncio.sleep(0)
    assert handle.run.sent[-1] == call(9)
    handle.run.results[-1].set_result(RunOutcome(ok=True, payload=b"\x09"))
    assert (await asyncio.wait_for(again, 1.0)).payload == b"\x09"
