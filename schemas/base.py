"""The common configuration of every wire model."""

from pydantic import BaseModel, ConfigDict


class WireModel(BaseModel):
    """Frozen, strict, and closed: unknown keys are rejected at every level."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
