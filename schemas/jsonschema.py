"""The JSON Schema of the wire, exported from the pydantic models (the one source of truth)."""

from typing import Any

from pydantic import TypeAdapter

from schemas.control import ControlRequest
from schemas.progress import ProgressMessage
from schemas.reply import Reply
from schemas.task import TaskMessage
from schemas.topology import CONTENT_TYPE, PROTOCOL_VERSION


def wire_schema() -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Swarm wire contract v{PROTOCOL_VERSION}",
        "description": f"Bodies are msgpack maps ({CONTENT_TYPE}); types as in JSON Schema.",
        "task": TaskMessage.model_json_schema(),
        "reply": Reply.model_json_schema(),
        "progress": ProgressMessage.model_json_schema(),
        "control": TypeAdapter(ControlRequest).json_schema(),
    }
