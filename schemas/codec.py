"""The msgpack codec: two functions, with hard limits checked before and during decoding.

Limits exist because a msgpack body is a compact description of Python objects: one byte
(0x90, an empty array) becomes a 56-byte list. Without a cap, an 8 MiB body of nested empty
containers costs ~450 MB. We count containers as they are built and stop at the cap, bound the
nesting depth (so that re-encoding a reply can never overflow), and refuse oversized bodies
before looking at a single byte.
"""

from dataclasses import dataclass
from typing import Any

import msgpack

from schemas.errors import SwarmError

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


class DecodeError(SwarmError, ValueError):
    """The bytes are not a well-formed msgpack value within the limits."""


class TooLarge(DecodeError):
    """The body is larger than the configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"body of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class CodecLimits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_depth: int = 64
    max_containers: int = 100_000


class _ContainerBudget:
    """Counts maps and arrays as msgpack builds them; raises past the cap."""

    __slots__ = ("left",)

    def __init__(self, cap: int) -> None:
        self.left = cap

    def _spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise DecodeError("too many maps and arrays in the body")

    def on_map(self, value: dict[Any, Any]) -> dict[Any, Any]:
        self._spend()
        return value

    def on_list(self, value: list[Any]) -> list[Any]:
        self._spend()
        return value


def _depth_exceeds(value: Any, max_depth: int) -> bool:
    """Level by level: true when containers nest deeper than max_depth. A container's children
    are looked at through `set(map(type, ...))`, in C: numeric arrays (a `predict` task's
    8,192 floats) cost a pass at C speed, not a Python step per number."""
    level: list[Any] = [value]
    depth = 1
    while level:
        deeper: list[Any] = []
        for item in level:
            children = item.values() if type(item) is dict else item
            kinds = set(map(type, children))
            if dict in kinds or list in kinds:
                deeper.extend(child for child in children if type(child) in (dict, list))
        if deeper and depth >= max_depth:
            return True
        level = deeper
        depth += 1
    return False


def decode(body: bytes, limits: CodecLimits = CodecLimits()) -> Any:
    """Decode one msgpack value. Raises TooLarge or DecodeError; never anything else."""
    if len(body) > limits.max_body_bytes:
        raise TooLarge(len(body), limits.max_body_bytes)
    budget = _ContainerBudget(limits.max_containers)
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=False,
            object_hook=budget.on_map,
            list_hook=budget.on_list,
        )
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types: ValueError, StackError, ...
        raise DecodeError(f"not msgpack: {type(exc).__name__}: {exc}".rstrip(": ")) from exc
    containers = limits.max_containers - budget.left
    if containers > limits.max_depth and _depth_exceeds(value, limits.max_depth):
        raise DecodeError(f"containers nest deeper than {limits.max_depth} levels")
    return value


def encode(value: Any) -> bytes:
    """Encode one value; raises TypeError for values msgpack cannot carry."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
