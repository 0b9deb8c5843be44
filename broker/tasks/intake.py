"""Intake: from raw delivery to a validated task, or a rejection with its wire error code.

Order matters and follows the contract: properties that could not be decoded first (the
message is malformed whatever its body), size before any decoding, content type, msgpack, the
schema, then the checks that need the daemon's state (queue, handlers). The task id is read as
early as possible so that even a rejected task is answered under its own id.
"""

import time
from typing import Any

from pydantic import ValidationError

from broker.errors import Rejection
from broker.tasks.delivery import Delivery
from schemas.codec import CodecLimits, DecodeError, TooLarge, decode
from schemas.task import TaskMessage
from schemas.topology import CONTENT_TYPE
from workers.registry import HandlerRegistry


def admit(
    delivery: Delivery, limits: CodecLimits, registry: HandlerRegistry
) -> TaskMessage | Rejection:
    if delivery.properties_error is not None:
        return Rejection(
            "malformed",
            f"AMQP properties could not be decoded: {delivery.properties_error}",
            id_despite_properties(delivery, limits),
        )
    if len(delivery.body) > limits.max_body_bytes:
        return Rejection("too_large", str(TooLarge(len(delivery.body), limits.max_body_bytes)))
    if delivery.content_type != CONTENT_TYPE:
        return Rejection(
            "malformed",
            f"content_type must be {CONTENT_TYPE!r}, got {delivery.content_type!r}",
        )
    try:
        payload = decode(delivery.body, limits)
    except TooLarge as exc:
        return Rejection("too_large", str(exc))
    except DecodeError as exc:
        return Rejection("malformed", str(exc))
    if not isinstance(payload, dict):
        return Rejection("malformed", f"body must be a msgpack map, got {type(payload).__name__}")
    task_id = readable_id(payload, delivery)
    try:
        task = TaskMessage.model_validate(payload)
    except ValidationError as exc:
        return Rejection("invalid", describe_validation(exc), task_id)
    if task.type != delivery.task_type:
        return Rejection(
            "type_mismatch",
            f"task type {task.type!r} arrived on the queue of {delivery.task_type!r}",
            task.id,
        )
    if not registry.serves(task.handler, task.type):
        known = registry.get(task.handler)
        detail = f"serves only {sorted(known.task_types)}" if known else "is not registered"
        return Rejection("unknown_handler", f"handler {task.handler!r} {detail}", task.id)
    return task


def readable_id(payload: dict[Any, Any], delivery: Delivery) -> str | None:
    """The task id for the reply: the body's `id` when it is a usable string, else message_id."""
    body_id = payload.get("id")
    if isinstance(body_id, str) and 0 < len(body_id) <= 128:
        return body_id
    return delivery.message_id


def id_despite_properties(delivery: Delivery, limits: CodecLimits) -> str | None:
    """The id to answer a message whose properties could not be decoded: the body's `id` when
    the body is a readable map within the limits (the content type is not asked: it may be
    what could not be decoded), else the message_id if that was readable."""
    if len(delivery.body) <= limits.max_body_bytes:
        try:
            payload = decode(delivery.body, limits)
        except DecodeError:  # TooLarge included
            payload = None
        if isinstance(payload, dict):
            return readable_id(payload, delivery)
    return delivery.message_id


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def is_expired(task: TaskMessage, now_s: float | None = None) -> bool:
    return task.deadline is not None and (now_s or time.time()) > task.deadline
