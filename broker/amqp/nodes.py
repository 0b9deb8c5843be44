"""The RabbitMQ nodes one process may connect to, and which one it uses.

Every node of a cluster serves every queue (a queue's replicas or its leader may live
elsewhere; RabbitMQ routes between nodes), so any node will do. A process connects to one at
a time; when that connection is lost, the next attempt starts with the node after it, so a
dead node is tried last, and each node is tried once per round before the caller backs off.
"""

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from broker.amqp.urls import redact, split_urls
from broker.errors import AmqpUnavailable

T = TypeVar("T")


class AmqpNodes:
    """The URLs of a cluster's nodes in the order they are tried; optionally shuffled once, so
    that many processes given the same list spread over the nodes."""

    def __init__(
        self, urls: str | Sequence[str], *, shuffle: bool = False, rng: random.Random | None = None
    ) -> None:
        listed = split_urls(urls)
        if not listed:
            raise ValueError("no RabbitMQ URL given")
        order = list(dict.fromkeys(listed))  # a node named twice is one node
        if shuffle:
            (rng or random.Random()).shuffle(order)
        self.urls: tuple[str, ...] = tuple(order)
        self._start = 0  # index of the node a round tries first
        self._in_use: int | None = None

    @property
    def in_use(self) -> str | None:
        """The URL of the node connected to; None while not connected."""
        return self.urls[self._in_use] if self._in_use is not None else None

    def round(self) -> list[str]:
        """Every node once, in the order to try them: the node connected to last comes first
        until its connection is lost, then last."""
        return [*self.urls[self._start :], *self.urls[: self._start]]

    def connected(self, url: str) -> None:
        self._in_use = self._start = self.urls.index(url)

    def lost(self) -> None:
        """The connection to the node in use is gone: the next round starts after it."""
        if self._in_use is not None:
            self._start = (self._in_use + 1) % len(self.urls)
        self._in_use = None

    def describe(self) -> dict[str, object]:
        """For status answers: the node in use and every node, passwords masked."""
        in_use = self.in_use
        return {
            "node": redact(in_use) if in_use is not None else None,
            "nodes": [redact(url) for url in self.urls],
        }


async def open_on_a_node(
    nodes: AmqpNodes,
    open_one: Callable[[str], Awaitable[T]],
    on_failed: Callable[[str, Exception], None] | None = None,
) -> T:
    """`open_one(url)` on each node of a round in turn until one succeeds; that node is then
    the one in use. With one URL its failure is raised as it came; with several, an
    AmqpUnavailable naming each node and why it failed."""
    failures: list[tuple[str, Exception]] = []
    for url in nodes.round():
        try:
            opened = await open_one(url)
        except Exception as exc:
            failures.append((url, exc))
            if on_failed is not None:
                on_failed(url, exc)
            continue
        nodes.connected(url)
        return opened
    if len(failures) == 1:
        raise failures[0][1]
    reasons = "; ".join(f"{redact(url)}: {_reason(exc)}" for url, exc in failures)
    raise AmqpUnavailable(
        f"cannot reach RabbitMQ at any of its {len(failures)} nodes ({reasons}). Start them "
        "or point AMQP_URL at running brokers."
    ) from failures[-1][1]


async def reopen_on_a_node(
    nodes: AmqpNodes,
    open_one: Callable[[str], Awaitable[object]],
    on_node_failed: Callable[[str, Exception], None],
    *,
    first_s: float,
    max_s: float,
    stopped: Callable[[], bool],
    on_round_failed: Callable[[Exception, float], None],
) -> bool:
    """After a lost connection: rounds of `open_on_a_node` until one opens (True), or until
    `stopped()` (False). Between rounds, `on_round_failed(error, delay_s)` and a sleep of
    `delay_s`, doubling from `first_s` up to `max_s`: every node was tried once, so hammering
    them again at once would only add load to a cluster that is restarting."""
    delay_s = first_s
    while not stopped():
        try:
            await open_on_a_node(nodes, open_one, on_node_failed)
            return True
        except Exception as exc:
            on_round_failed(exc, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(max_s, delay_s * 2)
    return False


def _reason(exc: Exception) -> str:
    """What went wrong, without the advice an AmqpUnavailable adds (said once, above)."""
    cause = exc.__cause__ if isinstance(exc, AmqpUnavailable) and exc.__cause__ else exc
    return f"{type(cause).__name__}: {cause}".rstrip(": ")
