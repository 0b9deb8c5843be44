"""Handler results onto the wire: msgpack, with the types handlers commonly return.

Pydantic models become their JSON-mode dicts and numpy arrays and scalars plain lists and
numbers, through msgpack's `default` hook, which msgpack calls only for a value it cannot
encode itself: plain results (the common case) pay nothing for it.
"""

from typing import Any

import msgpack
from pydantic import BaseModel


def encode_result(value: Any) -> bytes:
    """Encode a handler's result; raises TypeError for values that have no wire form."""
    return msgpack.packb(value, use_bin_type=True, default=_wire_form)  # type: ignore[no-any-return]


def _wire_form(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist) and type(value).__module__.split(".")[0] in ("numpy", "torch"):
        if type(value).__module__.startswith("torch"):
            value = value.detach().cpu()
            tolist = value.tolist
        return tolist()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"cannot encode object of type {type(value).__name__}")
