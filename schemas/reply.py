"""The reply message: what the daemon publishes to `reply_to` and to `swarm.results`."""

from typing import Any, Literal, TypeAlias

from pydantic import Field

from schemas.base import ProtocolVersion, WireModel

Status: TypeAlias = Literal["ok", "error", "expired", "cancelled"]

ErrorCode: TypeAlias = Literal[
    "malformed",
    "invalid",
    "unknown_handler",
    "type_mismatch",
    "too_large",
    "unsatisfiable",
    "expired",
    "timeout",
    "handler_error",
    "worker_lost",
    "cancelled",
    "redelivery_limit",
]


class ErrorInfo(WireModel):
    code: ErrorCode
    message: str
    retryable: bool = False


class Timing(WireModel):
    queued_ms: float = 0.0
    run_ms: float = 0.0


class Reply(WireModel):
    """One task's final outcome, or a control request's answer (then `id` is nil)."""

    v: ProtocolVersion = 1
    id: str | None
    status: Status
    result: Any = None
    error: ErrorInfo | None = None
    attempts: int = Field(default=0, ge=0)
    pool: str | None = None
    node: str | None = None
    timing: Timing = Field(default_factory=Timing)

    def wire_dict(self) -> dict[str, Any]:
        """The plain mapping that the codec encodes; every key is always present."""
        return self.model_dump(mode="python")
