"""What RabbitMQ made of a publish: a reply returned or refused, a dead letter refused; and
the dead letter each outcome calls for."""

from dataclasses import dataclass, field
from typing import Any

import aiormq

from broker.tasks.delivery import Delivery
from broker.tasks.outcome import Outcome
from schemas.topology import REPLY_UNDELIVERABLE, UNDELIVERED_REPLY_HEADER

# Why a reply did not reach `reply_to`: RabbitMQ returned it (mandatory, no such queue), or
# refused it (a nack: the queue is full with `x-overflow: reject-publish`, or rejects it).
RETURNED = "returned"
REFUSED = "refused"


class DeadLetterRefused(Exception):
    """swarm.dead refused a dead letter (a nack: full with reject-publish, or rejecting)."""


@dataclass(frozen=True)
class ReplyResult:
    undelivered: str | None  # None, RETURNED or REFUSED
    truncated: tuple[str, ...]  # reply headers dropped to fit the frame size
    copy_refused: bool = False  # a queue bound to swarm.results nacked the copy


@dataclass(frozen=True)
class DeadLetterReason:
    code: str
    message: str
    extra: dict[str, Any] = field(default_factory=dict)


def is_nack(error: aiormq.exceptions.DeliveryError) -> bool:
    return isinstance(error.frame, aiormq.spec.Basic.Nack)


def dead_letter_reason(
    delivery: Delivery, outcome: Outcome, undelivered: str | None
) -> DeadLetterReason | None:
    """An error outcome is dead-lettered with its own code; a reply that did not reach
    `reply_to` is too (code `reply_undeliverable` unless the outcome has its own), naming the
    queue in `x-swarm-reply-undeliverable`. Otherwise nothing is."""
    if undelivered is None:
        if not outcome.dead_letter:
            return None
        return DeadLetterReason(outcome.error_code or "", outcome.error_message or "")
    reply_to = delivery.reply_to
    if undelivered == REFUSED:
        why = (
            f"reply to {reply_to!r} was refused by RabbitMQ (nack): the queue exists but is "
            "full or rejects publishes; the reply is on swarm.results"
        )
    else:
        why = f"reply to {reply_to!r} was returned: no such queue"
    code = outcome.error_code if outcome.dead_letter else REPLY_UNDELIVERABLE
    message = outcome.error_message if outcome.dead_letter else why
    return DeadLetterReason(
        code or REPLY_UNDELIVERABLE, message or why, {UNDELIVERED_REPLY_HEADER: reply_to}
    )
