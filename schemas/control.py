"""Requests on the `swarm.control` queue."""

from typing import Annotated, Literal, TypeAlias

from pydantic import Field, TypeAdapter

from schemas.base import ProtocolVersion, WireModel


class StatusRequest(WireModel):
    v: ProtocolVersion
    op: Literal["status"]


class CancelRequest(WireModel):
    v: ProtocolVersion
    op: Literal["cancel"]
    id: Annotated[str, Field(min_length=1, max_length=128)]


class TaskRequest(WireModel):
    """What the daemon knows of one task: its stored outcome, or that it waits or runs."""

    v: ProtocolVersion
    op: Literal["task"]
    id: Annotated[str, Field(min_length=1, max_length=128)]


AnyControlRequest: TypeAlias = StatusRequest | CancelRequest | TaskRequest
ControlRequest: TypeAlias = Annotated[AnyControlRequest, Field(discriminator="op")]

_control_adapter: TypeAdapter[AnyControlRequest] = TypeAdapter(ControlRequest)


def parse_control(payload: object) -> AnyControlRequest:
    """Validate a decoded control body; raises pydantic.ValidationError."""
    return _control_adapter.validate_python(payload)
