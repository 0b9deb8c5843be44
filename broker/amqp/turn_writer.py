"""One connection's outgoing frames, a turn of the event loop's worth per socket write.

Why: aiormq writes each frame with a socket write of its own, after a channel lock and a
future per frame. On the hot path (broker/amqp/pipelined.py, broker/amqp/acks.py) the frames
handed over during one turn of the loop go to aiormq's write queue as one payload instead, so
its writer task makes one socket write for all of them, in order; aiormq keeps the connection,
its writer task and heartbeats.
"""

import asyncio

from aiormq.abc import ChannelFrame

# Bytes handed to aiormq's writer without waiting for the socket; past them a write waits
# until the socket took them (a slow link, RabbitMQ's connection.blocked), and what comes
# meanwhile is held here, so memory stays bounded by in-flight deliveries, not by the link.
DRAIN_AFTER_BYTES = 4 * 1024 * 1024


class TurnWriter:
    """One connection's frames, a loop turn's worth per write (see the module)."""

    def __init__(self, write_queue: "asyncio.Queue[ChannelFrame]") -> None:
        self._queue = write_queue
        self._parts: list[bytes] = []
        self._scheduled = False
        self._undrained = 0
        # Waiting for room in aiormq's bounded write queue, or for the socket to take a
        # large write; later frames wait behind it, in order.
        self._putting: asyncio.Task[None] | None = None
        self.writes = 0

    def write(self, payload: bytes) -> None:
        self._parts.append(payload)
        if not self._scheduled and self._putting is None:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._parts or self._putting is not None:
            return
        payload = b"".join(self._parts)
        self._parts = []
        self.writes += 1
        self._undrained += len(payload)
        drained: asyncio.Future[None] | None = None
        if self._undrained >= DRAIN_AFTER_BYTES:
            self._undrained = 0
            drained = asyncio.get_running_loop().create_future()
        frame = ChannelFrame(payload=payload, should_close=False, drain_future=drained)
        if drained is None:
            try:
                self._queue.put_nowait(frame)
                return
            except asyncio.QueueFull:
                pass
        self._putting = asyncio.ensure_future(self._put(frame, drained))

    async def _put(self, frame: ChannelFrame, drained: "asyncio.Future[None] | None") -> None:
        try:
            await self._queue.put(frame)
            if drained is not None:
                await drained
        finally:
            self._putting = None
        if self._parts:
            self._flush()

    async def drain(self) -> None:
        """Until everything handed over so far is written to the socket (at a clean close:
        the last turn's acks). Only while the connection is open: its writer must run."""
        while self._putting is not None:
            await asyncio.shield(self._putting)
        self._flush()
        while self._putting is not None:
            await asyncio.shield(self._putting)
        drained = asyncio.get_running_loop().create_future()
        await self._queue.put(ChannelFrame(payload=b"", should_close=False, drain_future=drained))
        await drained

    def close(self) -> None:
        if self._putting is not None:
            self._putting.cancel()
        self._parts = []
