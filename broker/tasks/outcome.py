"""A task's outcome, ready for the transport to publish, record and settle; and its builders."""

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.errors import Rejection
from broker.tasks.replies import encode_reply, error_reply
from schemas.reply import Reply, Timing

if TYPE_CHECKING:
    from broker.tasks.active import ActiveTask


@dataclass(frozen=True)
class Outcome:
    """What to do for one delivery.

    `reply_body` is already encoded. `reply` false means acknowledge without a reply (a
    redelivery of a task whose outcome is stored). `record` means append to the outcome store
    (every final outcome of an accepted task, once; never a body refused at intake, see
    `refused`). Every task whose status is `error` is dead-lettered, so that "rejected on
    arrival" and "failed for good" both reach `swarm.dead`; duplicates and control answers
    never are (`dead_letter_errors=False`).
    """

    task_id: str | None
    status: str
    reply_body: bytes
    routing_type: str
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0
    dead_letter_errors: bool = True
    record: bool = True
    reply: bool = True
    # False: not acknowledged now either; the delivery is settled by someone else (a renewal
    # copy of a task running here is settled with the task: see TaskProcessor).
    settle: bool = True
    # For metrics: where it ran (None when it never did) and how long it waited and ran.
    pool: str | None = None
    queued_ms: float = 0.0
    run_ms: float = 0.0
    # The handler's traceback (bounded), for the dead letter's x-swarm-traceback; never in
    # the reply.
    traceback: str | None = None
    # W3C trace context headers for the reply (broker/ops/tracing.py); None without a trace.
    trace_headers: dict[str, str] | None = None
    # The processor's entry for the run that produced it, ended once the outcome is settled
    # (TaskProcessor.settled); None for outcomes of no run of this daemon's.
    active: "ActiveTask | None" = field(default=None, compare=False, repr=False)

    @property
    def dead_letter(self) -> bool:
        return self.dead_letter_errors and self.status == "error"

    @property
    def recorded(self) -> bool:
        return self.record and self.task_id is not None


def rejected(
    rejection: Rejection,
    routing_type: str,
    task_id: str | None = None,
    *,
    status: str = "error",
    attempts: int = 0,
    pool: str | None = None,
    node: str | None = None,
    queued_ms: float = 0.0,
    run_ms: float = 0.0,
    traceback: str | None = None,
) -> Outcome:
    """An outcome with an error: `error` (with `rejection.code`), `expired` or `cancelled`."""
    task_id = task_id or rejection.task_id
    reply = error_reply(
        task_id,
        status,
        rejection.code,
        rejection.message,
        retryable=rejection.retryable,
        attempts=attempts,
        pool=pool,
        node=node,
        queued_ms=max(0.0, queued_ms),
        run_ms=run_ms,
    )
    return Outcome(
        task_id,
        status,
        encode_reply(reply),
        routing_type,
        rejection.code,
        rejection.message,
        attempts,
        pool=pool,
        queued_ms=max(0.0, queued_ms),
        run_ms=run_ms,
        traceback=traceback,
    )


def refused(rejection: Rejection, routing_type: str) -> Outcome:
    """A body refused at intake (malformed, too_large, invalid, type_mismatch,
    unknown_handler): answered under the id it carries (else its message_id) and dead-lettered,
    but never recorded. It was never accepted as that task, so it is not the id's final
    outcome: the same id sent again with a body that passes runs, and an id already finished
    keeps its stored outcome."""
    return dataclasses.replace(rejected(rejection, routing_type), record=False)


def succeeded(
    task_id: str,
    routing_type: str,
    payload: bytes | None,
    *,
    attempts: int,
    pool: str,
    node: str,
    queued_ms: float,
    run_ms: float,
) -> Outcome:
    reply = Reply(
        id=task_id,
        status="ok",
        attempts=attempts,
        pool=pool,
        node=node,
        timing=Timing(queued_ms=queued_ms, run_ms=run_ms),
    )
    return Outcome(
        task_id,
        "ok",
        encode_reply(reply, payload),
        routing_type,
        attempts=attempts,
        pool=pool,
        queued_ms=queued_ms,
        run_ms=run_ms,
    )


def duplicate(
    task_id: str, status: str, reply_body: bytes, routing_type: str, *, redelivered: bool
) -> Outcome:
    """The stored reply again: sent to a republished duplicate, withheld from a redelivery."""
    return Outcome(
        task_id,
        status,
        reply_body,
        routing_type,
        dead_letter_errors=False,
        record=False,
        reply=not redelivered,
    )


def held_copy(task_id: str, routing_type: str) -> Outcome:
    """A renewal copy of a task running here: no reply, no record, not settled now."""
    return Outcome(task_id, "held", b"", routing_type, record=False, reply=False, settle=False)
