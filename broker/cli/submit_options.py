"""`swarm submit`'s options read into a task body and checked against the wire schema
(schemas.task.TaskMessage) before anything is sent: a bad value is an `OptionError` naming
the option, never a round trip to the daemon and a dead letter."""

import json
import math
import uuid
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from schemas.task import TaskMessage
from schemas.topology import PROTOCOL_VERSION

# The task's keys as the command line names them.
OPTION_OF_FIELD = {
    "v": "the protocol version",
    "id": "--id",
    "type": "TYPE",
    "handler": "HANDLER",
    "args": "--args",
    "resources": "--resources",
    "pool": "--pool",
    "priority": "--priority",
    "deadline": "--deadline",
    "timeout_s": "--timeout",
    "max_retries": "--retries",
}


class OptionError(ValueError):
    """One option's value is not valid: the message names the option."""


def parse_args(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionError(f"--args is not JSON: {exc}") from None


def parse_deadline(
    deadline: str | None, deadline_in_s: float | None, *, now: float
) -> float | None:
    """`--deadline` (ISO 8601, local time without an offset, or Unix seconds) or
    `--deadline-in` (seconds from now) as Unix seconds; at most one of them."""
    if deadline is not None and deadline_in_s is not None:
        raise OptionError("--deadline and --deadline-in: give one of them, not both")
    if deadline_in_s is not None:
        if not math.isfinite(deadline_in_s) or deadline_in_s <= 0:
            raise OptionError(f"--deadline-in must be a number of seconds > 0, not {deadline_in_s}")
        return now + deadline_in_s
    if deadline is None:
        return None
    try:
        seconds = float(deadline)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise OptionError(f"--deadline must be a finite time, not {deadline!r}")
        return seconds
    try:
        return datetime.fromisoformat(deadline).timestamp()
    except ValueError:
        raise OptionError(
            f"--deadline {deadline!r} is neither ISO 8601 (2030-01-31T12:00:00+00:00) "
            "nor Unix seconds"
        ) from None


def parse_resources(text: str | None) -> dict[str, Any] | None:
    """`--resources` as JSON (`{"cpus": 2, "memory_mb": 4096}`) or as comma-separated
    key=value pairs (`cpus=2,memory_mb=4096`); the keys and values are checked with the task."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OptionError(f"--resources is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise OptionError("--resources must be a JSON object")
        return parsed
    resources: dict[str, Any] = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = pair.partition("=")
        if not equals or not key.strip() or not value.strip():
            raise OptionError(
                f"--resources: {pair!r} is not key=value (e.g. cpus=2,gpus=1,memory_mb=4096)"
            )
        try:
            resources[key.strip()] = json.loads(value.strip())
        except json.JSONDecodeError:
            raise OptionError(
                f"--resources: {key.strip()}={value.strip()} is not a number"
            ) from None
    if not resources:
        raise OptionError("--resources is empty (e.g. cpus=2,gpus=1,memory_mb=4096)")
    return resources


def build_task(
    task_type: str,
    handler: str,
    args: Any,
    *,
    task_id: str | None = None,
    resources: dict[str, Any] | None = None,
    pool: str | None = None,
    priority: int | None = None,
    deadline: float | None = None,
    timeout_s: float | None = None,
    max_retries: int | None = None,
) -> TaskMessage:
    """The task body, validated as the daemon will validate it; `OptionError` names the
    option of each value that is not valid, one line each."""
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": task_id if task_id is not None else uuid.uuid4().hex,
        "type": task_type,
        "handler": handler,
        "args": args,
        "resources": resources,
        "pool": pool,
        "priority": priority,
        "deadline": deadline,
        "timeout_s": timeout_s,
        "max_retries": max_retries,
    }
    try:
        return TaskMessage.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        raise OptionError("\n".join(_describe(error, body) for error in exc.errors())) from None


def _describe(error: Any, body: dict[str, Any]) -> str:
    location = [str(part) for part in error.get("loc", ())]
    field = location[0] if location else ""
    option = OPTION_OF_FIELD.get(field, field)
    if field == "resources" and len(location) > 1:
        if error.get("type") == "extra_forbidden":
            return f"--resources: unknown key {location[1]!r} (cpus, gpus, memory_mb)"
        option = f"--resources {location[1]}"
        value = error.get("input")
    else:
        value = body.get(field)
    return f"{option}: {error.get('msg', 'invalid')} (got {json.dumps(value, default=str)})"
