"""A token bucket: at most `rate_per_s` acquisitions per second, without busy waiting.

Reservation style (as Go's `rate.Limiter.Reserve`): taking a token may drive the balance below
zero, and the caller sleeps exactly until that token would have been earned. One sleep per
acquisition, and the clock and the sleep are injected so tests count tokens, not wall time.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    """`rate_per_s` tokens per second, at most `burst` saved up. With `burst=1` any interval of
    `t` seconds sees at most `1 + rate_per_s * t` acquisitions."""

    def __init__(
        self,
        rate_per_s: float,
        *,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be > 0, not {rate_per_s}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, not {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = burst
        self._updated_s = clock()

    @property
    def tokens(self) -> float:
        """The balance now: negative while tokens already taken are still being earned."""
        return min(self.burst, self._tokens + (self._clock() - self._updated_s) * self.rate_per_s)

    def reserve(self) -> float:
        """Take one token; return the seconds to wait before using it (0.0: use it now)."""
        now_s = self._clock()
        self._tokens = min(self.burst, self._tokens + (now_s - self._updated_s) * self.rate_per_s)
        self._updated_s = now_s
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_per_s

    async def acquire(self) -> None:
        """Wait (one sleep, or none) until a token is ours. A cancelled wait keeps its token
        spent, which can only slow the caller down, never speed it up."""
        wait_s = self.reserve()
        if wait_s > 0:
            await self._sleep(wait_s)
