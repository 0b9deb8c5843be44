"""A confirm channel of its own for dead letters, replaced once swarm.dead refused on it.

Why: a quorum queue that refuses publishes (`x-overflow: reject-publish`) tells each channel
that published to it to refuse, and tells it to accept again only when it falls below its
limit. Lift the limit instead (clear the policy) and the channel keeps refusing forever,
drained queue or not, while a new channel is accepted at once (RabbitMQ 3.10, measured).
On the session's main channel that would refuse every later dead letter of the session; on
this one, the next dead letter after a refusal goes out on a new channel, and the refused
one is closed when the last publish using it is confirmed.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiormq.abc import AbstractChannel

CLOSE_TIMEOUT_S = 5.0


class RenewableChannel:
    def __init__(self, open_channel: Callable[[], Awaitable[AbstractChannel]]) -> None:
        self._open = open_channel
        self._current: AbstractChannel | None = None
        self._opening = asyncio.Lock()
        self._users: dict[AbstractChannel, int] = {}

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[AbstractChannel]:
        async with self._opening:
            if self._current is None or self._current.is_closed:
                self._current = await self._open()
            channel = self._current
        self._users[channel] = self._users.get(channel, 0) + 1
        try:
            yield channel
        finally:
            self._users[channel] -= 1
            if not self._users[channel]:
                del self._users[channel]
                if channel is not self._current:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(channel.close(), CLOSE_TIMEOUT_S)

    def renew(self, channel: AbstractChannel) -> None:
        """`channel` was refused on: later publishes get a new one."""
        if self._current is channel:
            self._current = None
