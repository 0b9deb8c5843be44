"""The AsyncAPI 3.0.0 document of the wire contract, built from the models and the topology names
(the one source of truth), from a producer's point of view.

`python -m schemas.asyncapi` prints it; `docs/asyncapi.json` is its checked-in rendering, which a
unit test keeps equal to it. Spec: https://www.asyncapi.com/docs/reference/specification/v3.0.0,
AMQP bindings: https://github.com/asyncapi/bindings/tree/master/amqp (version 0.3.0).
"""

import json
from typing import Any, Final, get_args

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from schemas.control import CancelRequest, ControlRequest, StatusRequest
from schemas.progress import PROGRESS_STATUS, ProgressMessage
from schemas.reply import ErrorCode, Reply, Status
from schemas.task import TaskMessage
from schemas.topology import (
    ATTEMPTS_HEADER,
    CONTENT_TYPE,
    CONTROL_QUEUE,
    CONTROL_QUEUE_ARGUMENTS,
    CONTROL_ROUTING_TYPE,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    DEAD_QUEUE_ARGUMENTS,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    ORIGINAL_USER_HEADER,
    PROGRESS_HEADER,
    PROTOCOL_VERSION,
    REPLY_UNDELIVERABLE,
    RESULTS_EXCHANGE,
    SOURCE_QUEUE_HEADER,
    STATUS_HEADER,
    TASK_QUEUE_ARGUMENTS,
    TASK_TYPES,
    TASKS_EXCHANGE,
    UNDELIVERED_REPLY_HEADER,
    task_queue,
)

ASYNCAPI_VERSION: Final = "3.0.0"
AMQP_BINDING_VERSION: Final = "0.3.0"
SCHEMA_REF: Final = "#/components/schemas/{model}"


# AsyncAPI has runtime expressions for headers and payload only, none for protocol properties:
# these name the AMQP properties as if they were headers (the info description says so).
REPLY_TO: Final = "$message.header#/reply_to"
CORRELATION_ID: Final = "$message.header#/correlation_id"


class _EveryKeyWritten(GenerateJsonSchema):
    """For the bodies the daemon writes (`Reply.wire_dict()`, `model_dump()`): every key is
    always there, so the serialization schema lists them all as required."""

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        return True


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document (a JSON-ready dict) of wire protocol `PROTOCOL_VERSION`."""
    schemas: dict[str, Any] = {}
    task = _component(TaskMessage.model_json_schema(ref_template=SCHEMA_REF), schemas)
    reply = _component(_written(Reply), schemas)
    progress = _component(_written(ProgressMessage), schemas)
    control = TypeAdapter(ControlRequest).json_schema(ref_template=SCHEMA_REF)
    # AsyncAPI's `discriminator` is the property name, not OpenAPI's object.
    control["discriminator"] = control["discriminator"]["propertyName"]
    control.update(title="ControlRequest", description="A request on `swarm.control`.")
    control_request = _component(control, schemas)

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for task_type in TASK_TYPES:
        channels[f"task_{task_type}"] = {
            "address": task_type,
            "title": f"{task_type} tasks",
            "description": (
                f"Routing key `{task_type}` on exchange `{TASKS_EXCHANGE}`, which routes to queue "
                f"`{task_queue(task_type)}`. Publishing to the default exchange with routing key "
                f"`{task_queue(task_type)}` reaches the same queue. The body's `type` must be "
                f"`{task_type}` (else `type_mismatch`)."
            ),
            "messages": {"Task": _message_ref("Task")},
            "bindings": _exchange_binding(TASKS_EXCHANGE, "direct"),
        }
        channels[f"task_queue_{task_type}"] = _queue_channel(
            task_queue(task_type),
            TASK_QUEUE_ARGUMENTS,
            f"The queue of {task_type} tasks, bound to `{TASKS_EXCHANGE}` with key "
            f"`{task_type}`; the daemon consumes it. Declare it with these arguments, if at all.",
            {"Task": _message_ref("Task")},
        )
        operations[f"send_task_{task_type}"] = {
            "action": "send",
            "channel": _ref("channels", f"task_{task_type}"),
            "title": f"Send a {task_type} task",
            "summary": "Publish a task; its reply comes to `reply_to`, and to `swarm.results`.",
            "messages": [_ref("channels", f"task_{task_type}", "messages", "Task")],
            "bindings": {"amqp": {"deliveryMode": 2, "bindingVersion": AMQP_BINDING_VERSION}},
            "reply": {
                "address": {
                    "location": REPLY_TO,
                    "description": "The task's `reply_to` property: optional; without it the "
                    "reply goes only to `swarm.results`.",
                },
                "channel": _ref("channels", "reply"),
                "messages": [
                    _ref("channels", "reply", "messages", "Reply"),
                    _ref("channels", "reply", "messages", "Progress"),
                ],
            },
        }
    channels["results"] = {
        "address": "{type}.{status}",
        "title": "Every reply",
        "description": (
            f"Topic exchange `{RESULTS_EXCHANGE}`: a copy of every reply, always, for "
            "event-driven subscribers, which bind a queue of their own (e.g. `inference.*`, "
            f"`*.error`, `#`). Control answers come under `{CONTROL_ROUTING_TYPE}.<status>`."
        ),
        "parameters": {
            "type": {
                "enum": [*TASK_TYPES, CONTROL_ROUTING_TYPE],
                "description": "The task's type (its source queue's when the body was "
                "unreadable), or `control`.",
            },
            "status": {"enum": list(get_args(Status)), "description": "The reply's status."},
        },
        "messages": {"Reply": _message_ref("Reply")},
        "bindings": _exchange_binding(RESULTS_EXCHANGE, "topic"),
    }
    channels["dead_exchange"] = {
        "address": None,
        "title": "Dead letters (exchange)",
        "description": f"Fanout exchange `{DEAD_EXCHANGE}` (routing keys are ignored): task "
        "queues dead-letter here, and so does the daemon.",
        "messages": {"DeadLetter": _message_ref("DeadLetter")},
        "bindings": _exchange_binding(DEAD_EXCHANGE, "fanout"),
    }
    channels["dead_letters"] = _queue_channel(
        DEAD_QUEUE,
        DEAD_QUEUE_ARGUMENTS,
        f"Bound to exchange `{DEAD_EXCHANGE}`: every task whose outcome is `error`.",
        {"DeadLetter": _message_ref("DeadLetter")},
    )
    channels["control"] = _queue_channel(
        CONTROL_QUEUE,
        CONTROL_QUEUE_ARGUMENTS,
        "Control requests (`status`, `cancel`), with a `reply_to`.",
        {"ControlRequest": _message_ref("ControlRequest")},
    )
    channels["reply"] = {
        "address": None,
        "title": "The producer's reply queue",
        "description": "The queue named by the request's `reply_to` (a server-named queue, a "
        "durable queue, or `amq.rabbitmq.reply-to`), reached through the default exchange. "
        f"`{STATUS_HEADER}` tells a progress message from the reply.",
        "messages": {"Reply": _message_ref("Reply"), "Progress": _message_ref("Progress")},
    }
    operations["receive_results"] = {
        "action": "receive",
        "channel": _ref("channels", "results"),
        "title": "Receive every reply",
        "summary": "Bind a queue to `swarm.results` and consume it.",
        "messages": [_ref("channels", "results", "messages", "Reply")],
        "bindings": {"amqp": {"deliveryMode": 2, "bindingVersion": AMQP_BINDING_VERSION}},
    }
    operations["receive_dead_letters"] = {
        "action": "receive",
        "channel": _ref("channels", "dead_letters"),
        "title": "Receive dead letters",
        "messages": [_ref("channels", "dead_letters", "messages", "DeadLetter")],
    }
    operations["send_control"] = {
        "action": "send",
        "channel": _ref("channels", "control"),
        "title": "Send a control request",
        "summary": "The answer is a reply with `id` nil and the answer in `result`.",
        "messages": [_ref("channels", "control", "messages", "ControlRequest")],
        "reply": {
            "address": {"location": REPLY_TO, "description": "The request's `reply_to`."},
            "channel": _ref("channels", "reply"),
            "messages": [_ref("channels", "reply", "messages", "Reply")],
        },
    }
    messages = _messages(task, reply, progress, control_request)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Swarm wire contract",
            "version": f"{PROTOCOL_VERSION}.0.0",
            "description": (
                f"Protocol version {PROTOCOL_VERSION}, between producers and the Swarm broker "
                f"daemon, from a producer's point of view. Bodies are msgpack maps "
                f"(`{CONTENT_TYPE}`) with string keys; their schemas are JSON Schema types "
                "exported from the pydantic models in `schemas/`. Unknown keys are rejected at "
                "every level and an optional key given as nil counts as absent.\n\n"
                "`reply_to` and `correlation_id` are AMQP properties, not headers: AsyncAPI "
                "has no runtime expression for properties, so `$message.header#/reply_to` and "
                "`$message.header#/correlation_id` name them. Message `headers` are the AMQP "
                "application headers."
            ),
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "amqp": _server("localhost:5672", "amqp", "RabbitMQ."),
            "amqps": _server("localhost:5671", "amqps", "RabbitMQ over TLS."),
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "userPassword": {"type": "userPassword", "description": "AMQP PLAIN login."}
            },
        },
    }


def _messages(
    task: dict[str, str],
    reply: dict[str, str],
    progress: dict[str, str],
    control_request: dict[str, str],
) -> dict[str, Any]:
    status_header = {"type": "string", "enum": list(get_args(Status))}
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
            "description": "AMQP properties: `message_id` the task id (optional: the body's "
            "`id` rules); `correlation_id` optional, copied onto the reply, defaults to the task "
            "id; `reply_to` optional; `expiration` honoured while queued (an expired message is "
            "dead-lettered by RabbitMQ); `delivery_mode` 2 recommended.",
            "correlationId": correlation,
            "headers": _headers(
                {
                    PROGRESS_HEADER: {
                        "type": ["boolean", "integer", "string"],
                        "description": 'Swarm\'s addition: true, 1, "1" or "true" asks for '
                        "progress messages on `reply_to` before the reply. Absent: none.",
                        "examples": [True],
                    }
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
            "headers": _headers({STATUS_HEADER: status_header}, required=[STATUS_HEADER]),
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
            "summary": "`status` (pools, nodes, queues, limits) or `cancel` a task by id.",
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
            "summary": "A task whose outcome is `error`, with its original body bytes and "
            "properties (but `expiration`; a missing `message_id` may be filled in).",
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
                    UNDELIVERED_REPLY_HEADER: {
                        "type": "string",
                        "description": "Swarm's addition: the `reply_to` queue that the reply "
                        f"could not reach (the code is then `{REPLY_UNDELIVERABLE}` or the "
                        "task's own).",
                    },
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


def _written(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(
        ref_template=SCHEMA_REF, mode="serialization", schema_generator=_EveryKeyWritten
    )


def _component(schema: dict[str, Any], into: dict[str, Any]) -> dict[str, str]:
    """Move `schema` and its `$defs` into `into` (components.schemas); return a `$ref` to it."""
    name = schema["title"]
    for key, value in {**schema.pop("$defs", {}), name: schema}.items():
        if into.setdefault(key, value) != value:
            raise ValueError(f"two different schemas are named {key!r}")
    return {"$ref": SCHEMA_REF.format(model=name)}


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


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(path)}


def _message_ref(name: str) -> dict[str, str]:
    return _ref("components", "messages", name)


def _exchange_binding(name: str, kind: str) -> dict[str, Any]:
    exchange = {"name": name, "type": kind, "durable": True, "autoDelete": False, "vhost": "/"}
    return {
        "amqp": {"is": "routingKey", "exchange": exchange, "bindingVersion": AMQP_BINDING_VERSION}
    }


def _queue_channel(
    name: str, arguments: dict[str, Any], description: str, messages: dict[str, Any]
) -> dict[str, Any]:
    queue = {
        "name": name,
        "durable": True,
        "exclusive": False,
        "autoDelete": False,
        "vhost": "/",
        # The binding has no field for queue arguments: an extension carries them.
        "x-arguments": arguments,
    }
    return {
        "address": name,
        "title": name,
        "description": description,
        "messages": messages,
        "bindings": {
            "amqp": {"is": "queue", "queue": queue, "bindingVersion": AMQP_BINDING_VERSION}
        },
    }


def _server(host: str, protocol: str, description: str) -> dict[str, Any]:
    return {
        "host": host,
        "protocol": protocol,
        "protocolVersion": "0.9.1",
        "description": description + " Replace the host with your broker's.",
        "security": [_ref("components", "securitySchemes", "userPassword")],
    }


def render() -> str:
    """The document as checked in at docs/asyncapi.json: sorted keys, 2-space indent."""
    return json.dumps(asyncapi_document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
