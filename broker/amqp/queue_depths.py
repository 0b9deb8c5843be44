"""Queue depths by passive declare, on one channel kept for the purpose.

Opening and closing a channel per read cost about 4 KB that aio-pika/aiormq never gave back
(40 MB per 10,000 reads). The channel is opened on first use and reopened only when it is
gone: the connection was replaced, or RabbitMQ closed it (a passive declare of a queue that
no longer exists is a 404, which closes the channel).
"""

import asyncio
import contextlib

from aio_pika.abc import AbstractChannel, AbstractConnection

# An answer to a passive declare takes milliseconds; a silent broker must not hang a reader.
DECLARE_TIMEOUT_S = 10.0
CHANNEL_CLOSE_S = 5.0


class QueueDepths:
    def __init__(self) -> None:
        self._channel: AbstractChannel | None = None
        self._connection: AbstractConnection | None = None
        self.channels_opened = 0
        self.reads = 0
        # Consumers per queue at the last read (every daemon's, as RabbitMQ counts them).
        self.consumers: dict[str, int] = {}

    async def read(self, connection: AbstractConnection, names: list[str]) -> dict[str, int]:
        """Messages ready in each queue. Not re-entrant: callers serialise (SharedRead)."""
        channel = await self._channel_on(connection)
        self.reads += 1
        try:
            underlay = await channel.get_underlay_channel()
            depths, consumers = {}, {}
            for name in names:
                declared = await underlay.queue_declare(
                    name, passive=True, timeout=DECLARE_TIMEOUT_S
                )
                depths[name] = int(declared.message_count or 0)
                consumers[name] = int(declared.consumer_count or 0)
            self.consumers = consumers
            return depths
        except BaseException:
            # Closed by RabbitMQ, timed out or cancelled half way: a fresh channel next time.
            await self._discard()
            raise

    async def _channel_on(self, connection: AbstractConnection) -> AbstractChannel:
        if self._connection is not connection or self._channel is None or self._channel.is_closed:
            await self._discard()
            self._channel = await connection.channel(publisher_confirms=False)
            self._connection = connection
            self.channels_opened += 1
        return self._channel

    async def _discard(self) -> None:
        channel, self._channel, self._connection = self._channel, None, None
        if channel is not None and not channel.is_closed:
            # Bounded: closing a channel whose last call was cancelled can wait forever.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), CHANNEL_CLOSE_S)
