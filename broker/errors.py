"""The broker's errors, and the one control signal of intake: a task rejected with a code."""

from dataclasses import dataclass

from schemas.errors import SwarmError


class BrokerError(SwarmError):
    """Base of the daemon's own errors."""


class AmqpUnavailable(BrokerError):
    """RabbitMQ could not be reached or refused us."""


@dataclass(frozen=True)
class Rejection:
    """A task answered without running: the wire error code, a message, and the id if known.

    A control signal, not a fault: rejections are logged at info level, never as errors.
    """

    code: str
    message: str
    task_id: str | None = None
    retryable: bool = False
