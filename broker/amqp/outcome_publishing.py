"""Publishing one task's outcome across sessions: the reply, the dead letter, the record.

Order. An `ok` outcome sends its reply, copy and record in parallel (the hot path: one round
trip). An outcome that is dead-lettered sends its reply and copy, then the dead letter, and
only then the record: were the record first, a daemon dying while the dead letter waits
would leave the next daemon to acknowledge the redelivery from the outcome store, and the
dead letter would be lost. This way the redelivery runs again (at worst a second reply with
the same content, as for any daemon death between reply and record).

No publish is retried forever. A step whose connection drops under it is sent again on the
next session; after `MAX_LOST_SESSIONS` lost connections it is sent *stripped* (a reply
without trace headers, a dead letter without the task's own headers and with its message
cut to 256 bytes), and after as many more it is abandoned: `PublishAbandoned`, and the
ingress hands the task back to RabbitMQ. Each is an error log line (`publish_stripped`,
`publish_abandoned`) and a counter.

A reply its queue refuses (a nack) is sent again, alone (its copy and record went out), on a
fresh channel after 0.2 s, 0.4 s, ... up to 2 s between tries for `refused_reply_retry_s`
(`SWARM_REFUSED_REPLY_RETRY_S`, 10 s): a quorum reply queue whose leader's node died nacks
publishes until it has elected another (RabbitMQ 3.10: within 3 s of a `kill -9`). Only a
reply refused through every try is dead-lettered `reply_undeliverable`; a full queue
(`x-overflow: reject-publish`) that makes room within the window gets its reply.

A dead letter that swarm.dead refuses (a nack) is not dropped: the task stays
unacknowledged, its handler is not run again, and the dead letter is sent again (on a new
channel: see broker/amqp/renewable_channel.py) after 1 s, 2 s, 4 s, ... up to 30 s between tries
until swarm.dead takes it; every refusal is an error log line (`dead_letter_refused`) and
counts in `swarm_dead_letters_refused`, the tasks held in `swarm_dead_letters_waiting`.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from broker.amqp.publish_results import (
    REFUSED,
    DeadLetterReason,
    DeadLetterRefused,
    dead_letter_reason,
)
from broker.amqp.publish_stats import PublishStats
from broker.amqp.publisher import Publisher
from broker.amqp.session import CONNECTION_ERRORS, AmqpSession
from broker.tasks.delivery import Delivery
from broker.tasks.outcome import Outcome

log = structlog.get_logger("swarm.publishing")

MAX_LOST_SESSIONS = 3
DEAD_LETTER_RETRY_FIRST_S = 1.0
DEAD_LETTER_RETRY_MAX_S = 30.0
REPLY_RESEND_FIRST_S = 0.2
REPLY_RESEND_MAX_S = 2.0

T = TypeVar("T")
Step = Callable[[Publisher, bool], Awaitable[T]]


class PublishAbandoned(Exception):
    """A publish step lost too many connections, stripped too: the task goes back."""


class OutcomePublishing:
    def __init__(
        self,
        ready: asyncio.Event,
        current: Callable[[], AmqpSession | None],
        stats: PublishStats,
        refused_reply_retry_s: float = 10.0,
    ) -> None:
        self._ready = ready
        self._current = current
        self.stats = stats
        self._refused_reply_retry_s = refused_reply_retry_s

    async def publish(self, delivery: Delivery, outcome: Outcome, record: bytes | None) -> None:
        """Reply, dead letter (when due) and record, confirmed; see the module's rules."""
        dead_lettered = outcome.dead_letter
        together = None if dead_lettered else record
        result = await self._on_sessions(
            "reply",
            lambda publisher, stripped: publisher.publish_reply(
                delivery, outcome, together, stripped=stripped
            ),
        )
        if result.truncated:
            self.stats.headers_truncated += 1
            log.warning("reply_headers_dropped", dropped=list(result.truncated))
        undelivered = result.undelivered
        if undelivered == REFUSED:
            undelivered = await self._resend_refused_reply(delivery, outcome)
        if undelivered == REFUSED:
            self.stats.replies_refused += 1
            log.warning("reply_refused", reply_to=delivery.reply_to)  # it is dead-lettered
        if result.copy_refused:
            self.stats.results_copies_refused += 1
            log.warning("results_copy_refused")  # not sent again
        reason = dead_letter_reason(delivery, outcome, undelivered)
        if reason is not None:
            await self._dead_letter(delivery, outcome, reason)
        if dead_lettered and record is not None:
            await self._on_sessions(
                "outcome record", lambda publisher, _: publisher.append_record(record)
            )

    async def _resend_refused_reply(self, delivery: Delivery, outcome: Outcome) -> str | None:
        """Send a refused reply again, with backoff, while the window lasts; what became of
        it: None (taken), REFUSED or RETURNED."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._refused_reply_retry_s
        delay_s = REPLY_RESEND_FIRST_S
        undelivered: str | None = REFUSED
        while undelivered == REFUSED and loop.time() + delay_s <= deadline:
            await asyncio.sleep(delay_s)
            delay_s = min(REPLY_RESEND_MAX_S, delay_s * 2)
            self.stats.replies_resent += 1
            undelivered = await self._on_sessions(
                "reply",
                lambda publisher, stripped: publisher.resend_reply(
                    delivery, outcome, stripped=stripped
                ),
            )
        if undelivered is None:
            log.info("reply_taken_on_resend", reply_to=delivery.reply_to)
        return undelivered

    async def _dead_letter(
        self, delivery: Delivery, outcome: Outcome, reason: DeadLetterReason
    ) -> None:
        delay_s = DEAD_LETTER_RETRY_FIRST_S
        waiting = False
        try:
            while True:
                try:
                    truncated = await self._on_sessions(
                        "dead letter",
                        lambda publisher, stripped: publisher.publish_dead_letter(
                            delivery, outcome, reason, stripped=stripped
                        ),
                    )
                    break
                except DeadLetterRefused:
                    self.stats.dead_letters_refused += 1
                    if not waiting:
                        waiting = True
                        self.stats.dead_letters_waiting += 1
                    # The task is held, not run again, and the dead letter sent again.
                    log.error("dead_letter_refused", retry_in_s=delay_s)
                    log.debug("dead_letter_refused_traceback", exc_info=True)
                    await asyncio.sleep(delay_s)
                    delay_s = min(DEAD_LETTER_RETRY_MAX_S, delay_s * 2)
        finally:
            if waiting:
                self.stats.dead_letters_waiting -= 1
        counts = self.stats.dead_letters
        counts[reason.code] = counts.get(reason.code, 0) + 1  # confirmed by swarm.dead
        if truncated:
            self.stats.headers_truncated += 1
            log.warning("dead_letter_truncated", truncated=list(truncated)[:20])

    async def _on_sessions(self, what: str, step: Step[T]) -> T:
        """`step` on the current session; when the connection drops under it, on the next
        one: stripped after MAX_LOST_SESSIONS, abandoned after twice that. Its lines carry
        the task id from the context the ingress binds for the delivery."""
        lost = 0
        while True:
            await self._ready.wait()
            session = self._current()
            assert session is not None
            try:
                return await step(session.publisher, lost >= MAX_LOST_SESSIONS)
            except CONNECTION_ERRORS as exc:
                if not session.lost.is_set():
                    raise
                lost += 1
                if lost == MAX_LOST_SESSIONS:
                    self.stats.stripped += 1
                    log.error("publish_stripped", step=what, lost_connections=lost, error=str(exc))
                    log.debug("publish_stripped_traceback", exc_info=True)
                elif lost >= 2 * MAX_LOST_SESSIONS:
                    self.stats.abandoned += 1
                    # The task goes back to its queue (the ingress requeues it).
                    log.error("publish_abandoned", step=what, lost_connections=lost, error=str(exc))
                    log.debug("publish_abandoned_traceback", exc_info=True)
                    raise PublishAbandoned(what) from exc
                else:
                    log.info("publish_interrupted", error=str(exc))  # sent on the next session
                    log.debug("publish_interrupted_traceback", exc_info=True)
                await asyncio.sleep(0)
