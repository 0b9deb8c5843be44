"""The common configuration of every wire model."""

from typing import Annotated, TypeAlias

from pydantic import BaseModel, ConfigDict, Field

# An int equal to 1: not `Literal[1]`, which compares by equality and so lets msgpack `true`
# and `1.0` through even in strict mode.
ProtocolVersion: TypeAlias = Annotated[int, Field(ge=1, le=1, json_schema_extra={"const": 1})]


class WireModel(BaseModel):
    """Frozen, strict, and closed: unknown keys are rejected at every level, numbers must be
    finite (a NaN deadline would never pass), and no type is coerced into another."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)
