"""What the producers' client raises besides `BrokerError` itself."""

from broker.errors import BrokerError


class SubmitError(BrokerError):
    """The task could not be handed to RabbitMQ (unroutable or refused)."""


class ReplyTimeout(BrokerError):
    """No reply arrived within the client's wait (`wait_s`). `task_id` names the task (None
    for a control request), `queue` the queue it was sent to, and `consumers` how many
    consumers that queue had when the wait ended (0: no daemon reads it; None: unknown)."""

    def __init__(
        self,
        message: str,
        *,
        task_id: str | None = None,
        queue: str | None = None,
        consumers: int | None = None,
    ) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.queue = queue
        self.consumers = consumers
