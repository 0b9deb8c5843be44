"""A task's final outcome, ready for the transport to publish and settle."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    """What to send for one delivery: the reply bytes and, for errors, the dead letter's facts.

    `reply_body` is already encoded. Every task whose status is `error` is dead-lettered, so
    that "rejected on arrival" and "failed for good" both reach `swarm.dead`; control answers
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

    @property
    def dead_letter(self) -> bool:
        return self.dead_letter_errors and self.status == "error"
