"""Waiting on the fakes without sleeping, and a clock a test moves by hand."""

import asyncio
from collections.abc import Callable

# How long `Changes.until` waits before it fails the test: long enough for a loaded CI
# machine, short enough that a broken build fails the suite in seconds, not minutes.
UNTIL_TIMEOUT_S = 5.0


class Changes:
    """One notification shared by the fakes of a test: each fake calls `notify()` whenever
    its state changes (a publish, an ack, a run called or answered), and a test awaits
    `until(predicate)` over any of them. Nothing polls: the predicate is evaluated again only
    after a notification.

    Predicates must read state that the fakes change (the code under test changes nothing
    else the fakes would notice); `until` fails the test after `timeout_s` rather than hang.
    """

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def until(
        self,
        predicate: Callable[[], bool],
        what: str = "the condition",
        timeout_s: float = UNTIL_TIMEOUT_S,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate():
            waiter = loop.create_future()
            self._waiters.append(waiter)
            left = deadline - loop.time()
            try:
                await asyncio.wait_for(waiter, max(left, 0.0))
            except asyncio.TimeoutError:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


class FakeClock:
    """Wall-clock time (`time()`) and monotonic time (`monotonic()`) that move only when the
    test says so. Installed in place of the `time` module of one module under test
    (`monkeypatch.setattr(broker.tasks.intake, "time", clock)`), so nothing else is affected."""

    def __init__(self, now_s: float = 1_700_000_000.0) -> None:
        self.now_s = now_s

    def time(self) -> float:
        return self.now_s

    def monotonic(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds
