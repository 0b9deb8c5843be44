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

from schemas.asyncapi_messages import (
    AMQP_BINDING_VERSION,
    REPLY_TO,
    message_components,
)
from schemas.control import ControlRequest
from schemas.progress import ProgressMessage
from schemas.reply import Reply, Status
from schemas.task import TaskMessage
from schemas.topology import (
    CONTENT_TYPE,
    CONTROL_QUEUE,
    CONTROL_QUEUE_ARGUMENTS,
    CONTROL_ROUTING_TYPE,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    DEAD_QUEUE_ARGUMENTS,
    PROTOCOL_VERSION,
    RESULTS_EXCHANGE,
    STATUS_HEADER,
    TASK_QUEUE_ARGUMENTS,
    TASK_TYPES,
    TASKS_EXCHANGE,
    task_queue,
)

ASYNCAPI_VERSION: Final = "3.0.0"
SCHEMA_REF: Final = "#/components/schemas/{model}"


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
        "Control requests (`status`, `cancel`, `task`), with a `reply_to`.",
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
    messages = message_components(task, reply, progress, control_request)
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
