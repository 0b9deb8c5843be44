"""The progress message: a running task's report, sent to `reply_to` before the final reply.

Sent only when the task message carried the header `x-swarm-progress` (true or 1). It has
the task's `correlation_id` and the header `x-swarm-status: progress`; its `status` is always
"progress", a value no final reply ever has, so it cannot be taken for the reply. Best effort:
not persistent, not confirmed, not stored, not copied to `swarm.results`, and a retried task
reports again (with its new `attempt`).
"""

from typing import Any, Literal

from pydantic import Field

from schemas.base import ProtocolVersion, WireModel

PROGRESS_STATUS = "progress"


class ProgressMessage(WireModel):
    v: ProtocolVersion = 1
    id: str
    status: Literal["progress"] = "progress"
    # What the handler reported (any msgpack value), e.g. {"epoch": 3, "loss": 0.12}.
    progress: Any = None
    # 1, 2, ... per run: a consumer can drop a report that arrives after a later one.
    seq: int = Field(ge=1)
    attempt: int = Field(ge=1)
