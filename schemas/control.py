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


ControlRequest: TypeAlias = Annotated[StatusRequest | CancelRequest, Field(discriminator="op")]

_control_adapter: TypeAdapter[StatusRequest | CancelRequest] = TypeAdapter(ControlRequest)


def parse_control(payload: object) -> StatusRequest | CancelRequest:
    """Validate a decoded control body; raises pydantic.ValidationError."""
    return _control_adapter.validate_python(payload)
