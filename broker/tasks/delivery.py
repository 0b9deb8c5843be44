"""Per-delivery state, kept apart from the frozen task envelope."""

from dataclasses import dataclass, field
from typing import Any

from broker.tasks.settlement import Settlement
from schemas.topology import DELIVERY_COUNT_HEADER, PROGRESS_HEADER

__all__ = ["LEASE_HEADER", "Delivery", "Settlement"]

# Header on a copy of a long-running task that the daemon republished to renew its hold on it.
LEASE_HEADER = "x-swarm-lease"


@dataclass(frozen=True)
class Delivery:
    """One message as it arrived: the raw bytes and AMQP properties, and where it came from.

    `properties` holds the original AMQP properties by their aio-pika names, so a dead letter
    can carry them unchanged. `settle_token` is the transport's handle for acknowledging, a
    state machine that raises on a second ack (broker/tasks/settlement.py).
    """

    body: bytes
    queue: str
    task_type: str | None
    properties: dict[str, Any]
    redelivered: bool
    received_at_s: float
    settle_token: Settlement | None = field(default=None, compare=False, repr=False)
    # The headers table exactly as it arrived (AMQP field-table bytes, without the 4-byte
    # length prefix), so a dead letter can carry every entry unchanged: a table decoded to
    # Python values cannot always be encoded back (non-UTF-8 strings, doubles, long keys).
    raw_headers: bytes | None = field(default=None, compare=False, repr=False)
    # Why the AMQP properties could not be decoded; `properties` then holds what could be
    # salvaged, and the task is answered `malformed` and dead-lettered.
    properties_error: str | None = None
    # 0 for a task as the producer sent it; n for the n-th renewal copy Swarm itself made
    # (set by the processor once the header's seal verified: broker/tasks/leases.py).
    lease: int = 0
    # Deliveries of the task before this renewal copy was made, carried in its sealed lease
    # header (RabbitMQ counts a copy's deliveries from 0: it is a new message).
    carried_deliveries: int = 0

    @property
    def wants_progress(self) -> bool:
        """The producer asked for progress messages (and has a reply queue to get them)."""
        headers = self.properties.get("headers") or {}
        value = headers.get(PROGRESS_HEADER)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        wanted = value is True or value == 1 or str(value).lower() in ("1", "true")
        return wanted and self.reply_to is not None

    @property
    def earlier_deliveries(self) -> int:
        """How often the task was delivered before without reaching an outcome: the quorum
        queue's `x-delivery-count` (deliveries returned, requeued, or lost with their
        channel), plus those a renewal copy carries. RabbitMQ's count is read only when it
        marks the delivery redelivered, when the queue wrote the value over any the producer
        set: 0 on a first delivery, whatever its headers say. A redelivery without a readable
        count (a classic queue) counts 1."""
        if not self.redelivered:
            return self.carried_deliveries
        headers = self.properties.get("headers") or {}
        value = headers.get(DELIVERY_COUNT_HEADER)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            value = 1
        return self.carried_deliveries + value

    @property
    def content_type(self) -> str | None:
        value = self.properties.get("content_type")
        return value if isinstance(value, str) else None

    @property
    def message_id(self) -> str | None:
        value = self.properties.get("message_id")
        return value if isinstance(value, str) and value else None

    @property
    def correlation_id(self) -> str | None:
        value = self.properties.get("correlation_id")
        return value if isinstance(value, str) and value else None

    @property
    def reply_to(self) -> str | None:
        value = self.properties.get("reply_to")
        return value if isinstance(value, str) and value else None
