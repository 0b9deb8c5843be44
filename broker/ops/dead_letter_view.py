"""A dead letter as `swarm dead` and the console show it: one line's fields, or the whole of
it (body decoded, properties, headers, traceback)."""

import time
from typing import TYPE_CHECKING, Any

from schemas.codec import decode
from schemas.topology import TRACEBACK_HEADER

if TYPE_CHECKING:
    from broker.amqp.dead_letter_box import DeadLetter


def summary(letter: "DeadLetter", now: float) -> dict[str, Any]:
    age = letter.age_s(now)
    return {
        "id": letter.task_id,
        "code": letter.code,
        "handler": letter.handler,
        "queue": letter.queue,
        "attempts": letter.attempts,
        "age_s": round(age, 1) if age is not None else None,
        "error": letter.error,
    }


def details(letter: "DeadLetter") -> dict[str, Any]:
    """The summary, the body decoded, the properties, the headers (the traceback apart)."""
    try:
        body: Any = decode(letter.body)
    except Exception as exc:  # any bytes a producer sent
        body = {"undecodable": f"{type(exc).__name__}: {exc}", "bytes": letter.body[:256]}
    headers = letter.headers
    headers.pop(TRACEBACK_HEADER, None)
    message = letter.message
    return {
        **summary(letter, time.time()),
        "body": body,
        "properties": {
            "message_id": message.message_id,
            "correlation_id": message.correlation_id,
            "reply_to": message.reply_to,
            "content_type": message.content_type,
            "priority": message.priority,
            "timestamp": message.timestamp,
        },
        "headers": headers,
        "traceback": letter.traceback,
    }
