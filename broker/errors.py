"""The broker's errors, and the one control signal of intake: a task rejected with a code."""

from dataclasses import dataclass

from schemas.errors import SwarmError


class BrokerError(SwarmError):
    """Base of the daemon's own errors."""


class AmqpUnavailable(BrokerError):
    """RabbitMQ could not be reached or refused us."""


class AmqpLoginRefused(AmqpUnavailable):
    """RabbitMQ answered but refused the user name or password."""


class AmqpVhostRefused(AmqpUnavailable):
    """RabbitMQ took the login but refused the virtual host (missing, or no permissions)."""


class SettlementError(BrokerError):
    """A delivery was asked to do what its state does not allow (broker/tasks/settlement.py): a
    second ack, a requeue after an ack. Always a bug in Swarm, never the producer's doing."""

    def __init__(self, state: str, action: str) -> None:
        super().__init__(f"cannot {action} a delivery that is {state}")
        self.state = state
        self.action = action


class DeadlinePassed(BrokerError):
    """A control signal, not a fault: a task waiting for room saw its deadline pass, and the
    scheduler stopped its wait (the task is answered `expired`)."""

    def __init__(self, deadline: float) -> None:
        super().__init__(f"deadline {deadline} passed while waiting for room")
        self.deadline = deadline


class ScaleUpTimedOut(BrokerError):
    """A control signal, not a fault: a task waited for a pool with no actor while the cluster
    was asked to grow, and no node that could hold one came within the scale-up timeout (the
    task is answered `unsatisfiable`)."""

    def __init__(self, pool: str, timeout_s: float) -> None:
        super().__init__(
            f"the {pool!r} pool has no actor and the cluster's autoscaler added no node that "
            f"could hold one within {timeout_s:g} s (SWARM_SCALE_UP_TIMEOUT_S)"
        )
        self.pool = pool
        self.timeout_s = timeout_s


@dataclass(frozen=True)
class Rejection:
    """A task answered without running: the wire error code, a message, and the id if known.

    A control signal, not a fault: rejections are logged at info level, never as errors.
    """

    code: str
    message: str
    task_id: str | None = None
    retryable: bool = False
