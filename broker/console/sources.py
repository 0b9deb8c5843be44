"""Where the console's data comes from: the daemon's control requests (through the producers'
client), its Prometheus /metrics, and the dead letters of `swarm.dead`."""

import asyncio
import contextlib
import time
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from broker.amqp.dead_letter_box import DeadLetterBox, ReplayError
from broker.ops.dead_letter_filter import Group, LetterFilter, group_of, groups
from broker.ops.dead_letter_view import details, summary
from broker.producer.client import SwarmClient

if TYPE_CHECKING:
    from broker.amqp.dead_letter_box import DeadLetter

# How long a page waits for the daemon's answer to a control request.
CONTROL_WAIT_S = 10.0
SCRAPE_TIMEOUT_S = 5.0
# Letters read at most for one page or one action.
LETTER_LIMIT = 10_000

Labels = tuple[tuple[str, str], ...]
# Sample name (`swarm_tasks_finished_total`, `swarm_task_run_seconds_bucket`, ...) to
# (labels, value) pairs.
Scraped = dict[str, list[tuple[Labels, float]]]


class Daemon:
    """The daemon as the console asks it: a SwarmClient kept connected for the console's
    life (it reconnects by itself), its reply queue deleted on the way out."""

    def __init__(self, amqp_url: str, *, shuffle: bool = False) -> None:
        self._client = SwarmClient(amqp_url, shuffle=shuffle, delete_reply_queue=True)

    async def connect(self) -> None:
        await self._client.connect()

    async def close(self) -> None:
        await self._client.close()

    async def status(self) -> dict[str, Any]:
        return await self._client.status(wait_s=CONTROL_WAIT_S)

    async def task(self, task_id: str) -> dict[str, Any]:
        return await self._client.task(task_id, wait_s=CONTROL_WAIT_S)

    async def cancel(self, task_id: str) -> dict[str, Any]:
        return await self._client.cancel(task_id, wait_s=CONTROL_WAIT_S)


def parse_metrics(text: str) -> Scraped:
    scraped: Scraped = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            scraped[sample.name].append((labels, float(sample.value)))
    return dict(scraped)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        return str(response.read().decode())


async def scrape(url: str) -> Scraped:
    """The daemon's /metrics, parsed (OSError when it cannot be read)."""
    return parse_metrics(await asyncio.to_thread(_get, url))


def by_label(scraped: Scraped, name: str, label: str) -> dict[str, float]:
    """One gauge's values keyed by one of its labels."""
    return {dict(labels).get(label, ""): value for labels, value in scraped.get(name, [])}


# -- dead letters ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """Which letters an action takes: a LetterFilter (empty: all), and optionally one group of
    the dead-letter page, (code, handler, queue) as `groups` writes it ("-": not said)."""

    filter: LetterFilter = field(default_factory=LetterFilter)
    group: Group | None = None

    def __call__(self, letter: "DeadLetter") -> bool:
        if self.group is not None and group_of(letter) != self.group:
            return False
        return self.filter(letter)

    @property
    def everything(self) -> bool:
        return self.group is None and self.filter.empty


@dataclass
class Done:
    """What an action did: how many letters, and the failures (one line each)."""

    count: int
    failures: list[str]


class DeadLetters:
    """`swarm.dead` for the console: each call opens the box, reads, and closes it, so every
    letter read and not acted on goes back (broker/amqp/dead_letter_box.py)."""

    def __init__(self, amqp_url: str) -> None:
        self._url = amqp_url

    @contextlib.asynccontextmanager
    async def _chosen(self, selection: Selection) -> AsyncIterator[tuple[DeadLetterBox, list[Any]]]:
        async with DeadLetterBox.open(self._url) as box:
            yield box, [letter for letter in await box.scan(LETTER_LIMIT) if selection(letter)]

    async def read(self, selection: Selection) -> list[dict[str, Any]]:
        now = time.time()
        async with self._chosen(selection) as (_, letters):
            return [summary(letter, now) for letter in letters]

    async def grouped(self) -> tuple[list[tuple[Group, int]], int]:
        """Counts by (code, handler, queue), largest first, and the letters read in all."""
        async with self._chosen(Selection()) as (_, letters):
            return groups(letters), len(letters)

    async def show(self, task_id: str) -> dict[str, Any] | None:
        async with self._chosen(Selection(LetterFilter(ids=(task_id,)))) as (_, letters):
            return details(letters[0]) if letters else None

    async def replay(self, selection: Selection) -> Done:
        """Each chosen letter back to its queue, confirmed, then removed (the task runs again
        although its stored outcome is an error: it carries x-swarm-replay)."""
        done = Done(0, [])
        async with self._chosen(selection) as (box, letters):
            for letter in letters:
                try:
                    await box.replay(letter)
                    done.count += 1
                except ReplayError as exc:
                    done.failures.append(str(exc))
        return done

    async def purge(self, selection: Selection) -> Done:
        async with self._chosen(selection) as (box, letters):
            for letter in letters:
                await box.remove(letter)
            return Done(len(letters), [])
