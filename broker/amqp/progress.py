"""Progress messages of running tasks, sent in the background and bounded per task.

Why: a handler may report progress far faster than messages leave (a tight loop, a slow
link). Progress is best effort (the final reply is what is guaranteed, and goes after them),
so per task one message is in flight and at most PROGRESS_WAITING wait, in order; past that
the oldest waiting one is dropped and counted, and the `seq` of the messages sent shows the
gap. A chatty handler then costs one send task and a bounded number of bodies, not one of each
per report.
"""

import asyncio
from collections import deque
from collections.abc import Callable

import structlog

from broker.amqp.session import AmqpSession
from broker.tasks.delivery import Delivery

# The ingress's logger: these lines are the ingress's, as they were before this module.
log = structlog.get_logger("swarm.ingress")

# Progress messages of one task waiting behind the one being sent; past it the oldest goes.
PROGRESS_WAITING = 16


class ProgressSender:
    """Sends each task's progress on the current session (`session()`), one at a time."""

    def __init__(self, session: Callable[[], AmqpSession | None]) -> None:
        self._session = session
        # Per task whose progress is being sent (by _progress_key): its sender, and the
        # reports waiting behind the one being sent.
        self.sends: dict[int, asyncio.Task[None]] = {}
        self._waiting: dict[int, deque[bytes]] = {}
        self.superseded = 0

    def publish(self, delivery: Delivery, body: bytes) -> None:
        """Send a progress message in the background; one lost with a connection is not
        sent again. Past PROGRESS_WAITING waiting, the oldest waiting one is dropped (counted
        in `superseded`)."""
        session = self._session()
        if session is None or session.lost.is_set():
            return
        key = _progress_key(delivery)
        waiting = self._waiting.get(key)
        if waiting is not None:
            if len(waiting) >= PROGRESS_WAITING:
                waiting.popleft()
                self.superseded += 1
            waiting.append(body)
            return
        self._waiting[key] = deque([body])
        self.sends[key] = asyncio.ensure_future(self._send(key, delivery))

    async def _send(self, key: int, delivery: Delivery) -> None:
        waiting = self._waiting[key]
        try:
            while waiting:
                body = waiting.popleft()
                session = self._session()
                if session is None or session.lost.is_set():
                    return
                try:
                    await session.publisher.publish_progress(delivery, body)
                except Exception as exc:
                    log.debug("progress_not_sent", error=str(exc), exc_info=True)
        finally:
            del self._waiting[key]
            del self.sends[key]

    async def sent(self, delivery: Delivery) -> None:
        """Until the task's progress messages are out: its reply goes after them."""
        sender = self.sends.get(_progress_key(delivery))
        if sender is not None:
            await asyncio.wait({sender})


def _progress_key(delivery: Delivery) -> int:
    """One per delivery while it is processed: its settlement (the processor may hand on a
    copy of the Delivery with its lease read, never another settlement)."""
    token = delivery.settle_token
    return id(token) if token is not None else id(delivery)
