"""The messages of the AsyncAPI document (schemas/asyncapi.py): task, reply, progress, control
request and dead letter, with their headers, AMQP bindings and examples built through the
models."""

from typing import Any, Final, get_args

from pydantic import BaseModel

from schemas.control import CancelRequest, StatusRequest
from schemas.progress import PROGRESS_STATUS, ProgressMessage
from schemas.reply import ErrorCode, Reply, Status
from schemas.task import TaskMessage
from schemas.topology import (
    ATTEMPTS_HEADER,
    CONTENT_TYPE,
    DEAD_LETTERED_AT_HEADER,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    ORIGINAL_USER_HEADER,
    PROGRESS_HEADER,
    PROTOCOL_VERSION,
    REPLAY_HEADER,
    REPLY_UNDELIVERABLE,
    SOURCE_QUEUE_HEADER,
    STATUS_HEADER,
    TRACEBACK_HEADER,
    TRUNCATED_HEADER,
    UNDELIVERED_REPLY_HEADER,
    task_queue,
)

AMQP_BINDING_VERSION: Final = "0.3.0"

# AsyncAPI has runtime expressions for headers and payload only, none for protocol properties:
# these name the AMQP properties as if they were headers (the info description says so).
REPLY_TO: Final = "$message.header#/reply_to"
CORRELATION_ID: Final = "$message.header#/correlation_id"


def message_components(
    task: dict[str, str],
    reply: dict[str, str],
    progress: dict[str, str],
    control_request: dict[str, str],
) -> dict[str, Any]:
    status_header = {"type": "string", "enum": list(get_args(Status))}
    truncated_header = {
        "type": "string",
        "description": "Swarm's addition: what was dropped or shortened so that the message "
        "fits one content-header frame, comma-separated in the order cut (a reply: "
        "`tracestate`, `traceparent`, `correlation_id`; a dead letter: the error message, "
        "then original header keys, largest first). Absent when nothing was cut.",
    }
    error_codes = ", ".join(f"`{code}`" for code in (*get_args(ErrorCode), REPLY_UNDELIVERABLE))
    correlation = {
        "location": CORRELATION_ID,
        "description": "The task's `correlation_id` property (optional), copied onto its reply "
        "and progress messages; it defaults to the task id.",
    }
    task_example = TaskMessage.model_validate(
        {"v": PROTOCOL_VERSION, "id": "task-7", "type": "inference", "handler": "echo"}
        | {"args": {"text": "hello"}, "priority": 5, "timeout_s": 30.0}
    ).model_dump(exclude_none=True)
    amqp = {"amqp": {"bindingVersion": AMQP_BINDING_VERSION}}
    return {
        "Task": {
            "name": "Task",
            "title": "Task message",
            "summary": "A task for the daemon to run: msgpack body, `content_type` "
            f"`{CONTENT_TYPE}` (anything else is rejected `malformed`).",
            "description": "AMQP properties: `message_id` names the reply only of a body whose "
            "`id` cannot be read, and never a stored outcome (the body's `id` rules); "
            "`correlation_id` optional, copied onto the reply, defaults to the task "
            "id; `reply_to` optional; `expiration` honoured while queued (an expired message is "
            "dead-lettered by RabbitMQ); `delivery_mode` 2 recommended. Properties or headers "
            "that cannot be decoded are answered `malformed` and dead-lettered unchanged. A "
            "body rejected on arrival is not the final outcome of its id: a fixed body with the "
            "same id runs. `x-swarm-*` headers are Swarm's: a producer's `x-swarm-lease` is "
            "ignored.",
            "correlationId": correlation,
            "headers": _headers(
                {
                    PROGRESS_HEADER: {
                        "type": ["boolean", "integer", "string"],
                        "description": 'Swarm\'s addition: true, 1, "1" or "true" asks for '
                        "progress messages on `reply_to` before the reply. Absent: none.",
                        "examples": [True],
                    },
                    REPLAY_HEADER: {
                        "type": "string",
                        "description": "Swarm's addition, set by `swarm dead replay` (a replay "
                        "id): a task whose stored outcome is `error` runs again when it carries "
                        "one, and its new outcome replaces the stored one; a stored `ok` answers "
                        "it as a duplicate, never run again.",
                    },
                }
            ),
            "payload": task,
            "bindings": amqp,
            "examples": [{"name": "echo", "payload": task_example}],
        },
        "Reply": {
            "name": "Reply",
            "title": "Reply message",
            "summary": "One task's final outcome, or a control request's answer (`id` nil).",
            "description": "Sent to `reply_to` (when given) and always to `swarm.results`, "
            "persistent. Every key is always present. Error codes: "
            + ", ".join(f"`{code}`" for code in get_args(ErrorCode))
            + ".",
            "correlationId": correlation,
            "headers": _headers(
                {STATUS_HEADER: status_header, TRUNCATED_HEADER: truncated_header},
                required=[STATUS_HEADER],
            ),
            "payload": reply,
            "bindings": amqp,
            "examples": [
                _reply_example("ok", id="task-7", result={"text": "hello"}, attempts=1),
                _reply_example(
                    "error",
                    id="task-8",
                    error={"code": "handler_error", "message": "ValueError: no"},
                    attempts=1,
                ),
            ],
        },
        "Progress": {
            "name": "Progress",
            "title": "Progress message",
            "summary": f"Swarm's addition, opt-in by `{PROGRESS_HEADER}`: a running task's "
            "report, on `reply_to` only, before the reply.",
            "description": "Best effort: transient, not confirmed, not stored, not copied to "
            "`swarm.results`; a retried task reports again with its new `attempt`.",
            "correlationId": correlation,
            "headers": _headers(
                {STATUS_HEADER: {"type": "string", "const": PROGRESS_STATUS}},
                required=[STATUS_HEADER],
            ),
            "payload": progress,
            "bindings": amqp,
            "examples": [
                {
                    "headers": {STATUS_HEADER: PROGRESS_STATUS},
                    "payload": ProgressMessage(
                        id="task-9", progress={"epoch": 3, "loss": 0.12}, seq=3, attempt=1
                    ).model_dump(),
                }
            ],
        },
        "ControlRequest": {
            "name": "ControlRequest",
            "title": "Control request",
            "summary": "`status` (pools, nodes, queues, limits, the RabbitMQ node the daemon "
            "is connected to) or `cancel` a task by id.",
            "correlationId": correlation,
            "payload": control_request,
            "bindings": amqp,
            "examples": [
                {"name": "status", "payload": _dump(StatusRequest, op="status")},
                {"name": "cancel", "payload": _dump(CancelRequest, op="cancel", id="task-7")},
            ],
        },
        "DeadLetter": {
            "name": "DeadLetter",
            "title": "Dead letter",
            "summary": "A task whose outcome is `error`, with its original body bytes, "
            "properties (but `expiration`; a missing `message_id` may be filled in) and header "
            "entries byte for byte, then Swarm's own (which replace an original of the same "
            "key).",
            "description": "A task that expired while queued is dead-lettered by RabbitMQ "
            "itself: then it has RabbitMQ's `x-death` header instead of Swarm's. `expired` and "
            "`cancelled` outcomes are answered, not dead-lettered.",
            "headers": _headers(
                {
                    ERROR_CODE_HEADER: {
                        "type": "string",
                        "description": f"The reply's error code ({error_codes}).",
                    },
                    ERROR_MESSAGE_HEADER: {"type": "string", "maxLength": 4096},
                    SOURCE_QUEUE_HEADER: {
                        "type": "string",
                        "description": "The queue the task came from.",
                    },
                    ATTEMPTS_HEADER: {
                        "type": "integer",
                        "description": "Runs started; 0 for a task rejected on arrival.",
                    },
                    DEAD_LETTERED_AT_HEADER: {
                        "type": "integer",
                        "description": "Swarm's addition: when it was dead-lettered, in Unix "
                        "seconds (`swarm dead` filters on its age).",
                    },
                    TRACEBACK_HEADER: {
                        "type": "string",
                        "maxLength": 8192,
                        "description": "Swarm's addition: the traceback of the exception the "
                        "handler raised, its end kept; cut first (to its last 256 bytes, or "
                        "left out) when the headers would not fit one frame.",
                    },
                    UNDELIVERED_REPLY_HEADER: {
                        "type": "string",
                        "description": "Swarm's addition: the `reply_to` queue that the reply "
                        "could not reach, because it does not exist (returned) or refused it "
                        "(nack: full with reject-publish, or a quorum queue electing a leader) "
                        "through every re-send for SWARM_REFUSED_REPLY_RETRY_S; the code is then "
                        f"`{REPLY_UNDELIVERABLE}` or the task's own.",
                    },
                    TRUNCATED_HEADER: truncated_header,
                    ORIGINAL_USER_HEADER: {
                        "type": "string",
                        "description": "Swarm's addition: the task's `user_id` property, which "
                        "RabbitMQ would refuse on a publish by another user.",
                    },
                }
            ),
            "payload": {
                "description": "The original task body, byte for byte: usually a Task, but a "
                "body rejected as `malformed` or `too_large` can be anything."
            },
            "bindings": amqp,
            "examples": [
                {
                    "headers": {
                        ERROR_CODE_HEADER: "handler_error",
                        ERROR_MESSAGE_HEADER: "ValueError: no",
                        SOURCE_QUEUE_HEADER: task_queue(task_example["type"]),
                        ATTEMPTS_HEADER: 1,
                    },
                    "payload": task_example,
                }
            ],
        },
    }


def _headers(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """The AMQP application headers that the contract names (a message may carry others)."""
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _reply_example(status: str, **fields: Any) -> dict[str, Any]:
    reply = Reply.model_validate({"status": status, **fields})
    return {"name": status, "headers": {STATUS_HEADER: status}, "payload": reply.wire_dict()}


def _dump(model: type[BaseModel], **fields: Any) -> dict[str, Any]:
    return model.model_validate({"v": PROTOCOL_VERSION, **fields}).model_dump()
