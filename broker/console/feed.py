"""The overview's history: the daemon's /metrics sampled every few seconds and turned into
rates, latency percentiles and gauges; the last minutes kept, each new sample pushed to every
open overview as a server-sent event."""

import asyncio
import contextlib
import json
import math
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from broker.console.sources import Scraped, by_label

FINISHED = "swarm_tasks_finished_total"
QUEUED = "swarm_task_queued_seconds_bucket"
RUN = "swarm_task_run_seconds_bucket"
# Percentiles are read over this window of the latency histograms (over all observations since
# the daemon started while the console has sampled for less than that).
LATENCY_WINDOW_S = 60.0
HISTORY_S = 600.0


def _finished(scraped: Scraped) -> dict[str, float]:
    """Tasks answered since the daemon started, by "type status"."""
    counts: dict[str, float] = defaultdict(float)
    for labels, value in scraped.get(FINISHED, []):
        named = dict(labels)
        counts[f"{named.get('type', '?')} {named.get('status', '?')}"] += value
    return dict(counts)


def _buckets(scraped: Scraped, name: str) -> dict[float, float]:
    """A histogram's cumulative buckets summed over its other labels, by upper bound."""
    summed: dict[float, float] = defaultdict(float)
    for labels, value in scraped.get(name, []):
        summed[float(dict(labels)["le"])] += value
    return dict(summed)


def quantile(q: float, now: dict[float, float], then: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile over the observations between two readings (None when
    there were none)."""
    bounds = sorted(now)
    deltas = [(le, now[le] - then.get(le, 0.0)) for le in bounds]
    if any(count < 0 for _, count in deltas):  # the daemon restarted: all since then
        deltas = [(le, now[le]) for le in bounds]
    if not deltas or deltas[-1][1] <= 0:
        return None
    rank = q * deltas[-1][1]
    lower, below = 0.0, 0.0
    for le, count in deltas:
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return None


class Feed:
    """Samples `read()` (a parsed /metrics) every `interval_s` while running."""

    def __init__(
        self,
        read: Callable[[], Awaitable[Scraped]],
        interval_s: float,
        history_s: float = HISTORY_S,
    ) -> None:
        self._read = read
        self.interval_s = interval_s
        self.history: deque[dict[str, Any]] = deque(maxlen=max(2, int(history_s / interval_s)))
        # (time, queued buckets, run buckets) of recent readings, for the percentiles.
        self._readings: deque[tuple[float, dict[float, float], dict[float, float]]] = deque()
        self._previous: tuple[float, dict[str, float]] | None = None
        self._listeners: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self.error: str | None = None

    @property
    def latest(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None

    async def run(self) -> None:
        while True:
            await self.sample_once()
            await asyncio.sleep(self.interval_s)

    async def sample_once(self) -> None:
        at = time.time()
        try:
            scraped = await self._read()
        except Exception as exc:  # the daemon down or restarting: said on the page
            self.error = f"metrics not read: {type(exc).__name__}: {exc}"
            self._publish({"t": at, "error": self.error})
            return
        self.error = None
        sample = self.sample(at, scraped)
        self.history.append(sample)
        self._publish(sample)

    def sample(self, at: float, scraped: Scraped) -> dict[str, Any]:
        totals = _finished(scraped)
        rates: dict[str, float] = {}
        if self._previous is not None:
            then, before = self._previous
            elapsed = max(at - then, 1e-6)
            for key, count in totals.items():
                delta = count - before.get(key, 0.0)
                rates[key] = round((delta if delta >= 0 else count) / elapsed, 3)
        self._previous = (at, totals)
        queued, run = _buckets(scraped, QUEUED), _buckets(scraped, RUN)
        self._readings.append((at, queued, run))
        while len(self._readings) > 1 and self._readings[1][0] <= at - LATENCY_WINDOW_S:
            self._readings.popleft()
        oldest, queued_then, run_then = self._readings[0]
        if oldest > at - LATENCY_WINDOW_S:
            # The console is younger than the window: every observation since the daemon
            # started.
            queued_then, run_then = {}, {}
        latency = {
            "queue p50": quantile(0.5, queued, queued_then),
            "queue p99": quantile(0.99, queued, queued_then),
            "run p50": quantile(0.5, run, run_then),
            "run p99": quantile(0.99, run, run_then),
        }
        pools: dict[str, float] = {}
        for what in ("actors", "running", "waiting"):
            for pool, value in by_label(scraped, f"swarm_pool_{what}", "pool").items():
                pools[f"{pool} {what}"] = value
        in_flight = sum(value for _, value in scraped.get("swarm_tasks_in_flight", []))
        return {
            "t": at,
            "rates": rates,
            "latency": latency,
            "flight": {"in flight": in_flight},
            "pools": dict(sorted(pools.items())),
            "totals": dict(sorted(totals.items())),
        }

    def _publish(self, sample: dict[str, Any]) -> None:
        for listener in self._listeners:
            with contextlib.suppress(asyncio.QueueFull):  # a slow page misses a sample
                listener.put_nowait(sample)

    def close(self) -> None:
        """End every open stream (the console is stopping)."""
        for listener in self._listeners:
            with contextlib.suppress(asyncio.QueueFull):
                listener.put_nowait(None)

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events: the history so far (`history`), then each sample."""
        listener: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=64)
        self._listeners.add(listener)
        try:
            yield f"event: history\ndata: {json.dumps(list(self.history))}\n\n"
            while (sample := await listener.get()) is not None:
                yield f"data: {json.dumps(sample)}\n\n"
        finally:
            self._listeners.discard(listener)
