"""The broker's errors, and the one control signal of intake: a task rejected with a code."""

from dataclasses import dataclass

from schemas.errors import SwarmError


class BrokerError(SwarmError):
    """Base of the daemon's own errors."""


class ConfigError(BrokerError):
    """The configuration cannot work; raised at start-up with what to change."""


class AmqpUnavailable(BrokerError):
    """RabbitMQ could not be reached or refused us."""


class Unsatisfiable(BrokerError):
    """No node of the cluster could ever hold the resources asked."""

    def __init__(self, requested: dict[str, float | int], largest: dict[str, float | int]) -> None:
        super().__init__(f"no node can ever hold {requested}; the largest node has {largest}")
        self.requested = requested
        self.largest = largest


@dataclass(frozen=True)
class Rejection:
    """A task answered without running: the wire error code, a message, and the id if known.

    A control signal, not a fault: rejections are logged at info level, never as errors.
    """

    code: str
    message: str
    task_id: str | None = None
    retryable: bool = False
