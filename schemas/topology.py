"""Names of the exchanges and queues that make up the wire topology (PROTOCOL version 1)."""

from typing import Any, Final

PROTOCOL_VERSION: Final = 1
CONTENT_TYPE: Final = "application/msgpack"

TASKS_EXCHANGE: Final = "swarm.tasks"
DEAD_EXCHANGE: Final = "swarm.dead"
DEAD_QUEUE: Final = "swarm.dead"
RESULTS_EXCHANGE: Final = "swarm.results"
CONTROL_QUEUE: Final = "swarm.control"

TASK_TYPES: Final = ("training", "inference", "data_processing")

STATUS_HEADER: Final = "x-swarm-status"
ERROR_CODE_HEADER: Final = "x-swarm-error-code"
ERROR_MESSAGE_HEADER: Final = "x-swarm-error-message"
SOURCE_QUEUE_HEADER: Final = "x-swarm-source-queue"
ATTEMPTS_HEADER: Final = "x-swarm-attempts"
# Swarm's addition to the dead-letter headers: set when the reply could not reach `reply_to`.
UNDELIVERED_REPLY_HEADER: Final = "x-swarm-reply-undeliverable"
# Swarm's addition to the dead-letter headers: when it was dead-lettered (Unix seconds).
DEAD_LETTERED_AT_HEADER: Final = "x-swarm-dead-lettered-at"
# On a task message: set by `swarm dead replay` (a replay's id). A task whose stored outcome
# is `error` runs again when it carries one; a stored `ok` still answers it as a duplicate.
REPLAY_HEADER: Final = "x-swarm-replay"
# Swarm's addition to the dead-letter headers: the traceback of the exception the handler
# raised (at most 8,192 characters, its end kept; cut first when the frame is short).
TRACEBACK_HEADER: Final = "x-swarm-traceback"
# On a reply or dead letter: what was dropped or shortened to make it fit one content-header
# frame (comma-separated names, in the order they were cut).
TRUNCATED_HEADER: Final = "x-swarm-headers-truncated"
# On a task message: the producer wants `progress` messages on its reply queue (any of
# true, 1, "1", "true"). Opt-in, so a producer written from the contract alone, which takes
# the first message with its correlation_id as the reply, never sees one.
PROGRESS_HEADER: Final = "x-swarm-progress"
# Set by RabbitMQ on a redelivery from a quorum queue: how often the message was delivered
# before. Swarm reads it only on a delivery RabbitMQ marks redelivered, whose value RabbitMQ
# wrote; on a first delivery the header is whatever the producer put there.
DELIVERY_COUNT_HEADER: Final = "x-delivery-count"
# The original `user_id` property moves here: RabbitMQ refuses a publish whose user_id is not
# the publishing connection's own user, so the property itself cannot be kept.
ORIGINAL_USER_HEADER: Final = "x-swarm-original-user-id"


def task_queue(task_type: str) -> str:
    """The durable queue of one task type, e.g. `swarm.tasks.inference`."""
    return f"{TASKS_EXCHANGE}.{task_type}"


# The arguments every daemon declares its queues with: part of the contract ("the same for
# every daemon"), so they live with the names.
TASK_QUEUE_ARGUMENTS: Final[dict[str, Any]] = {
    "x-queue-type": "quorum",
    "x-single-active-consumer": True,
    "x-dead-letter-exchange": DEAD_EXCHANGE,
}
CONTROL_QUEUE_ARGUMENTS: Final[dict[str, Any]] = {
    "x-queue-type": "quorum",
    "x-single-active-consumer": True,
}
DEAD_QUEUE_ARGUMENTS: Final[dict[str, Any]] = {"x-queue-type": "quorum"}
# Control answers' type on swarm.results (routing key `control.<status>`).
CONTROL_ROUTING_TYPE: Final = "control"
# Swarm's own dead-letter code: the reply could not reach `reply_to`.
REPLY_UNDELIVERABLE: Final = "reply_undeliverable"
