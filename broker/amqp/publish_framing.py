"""The bytes of one basic.publish (method, content header and body frames), written by Swarm.

Why: the hot path (broker/amqp/pipelined.py) frames every reply, copy and outcome record
itself instead of going through pamqp's per-frame objects and validation, which cost more than
the write at the daemon's rate. tests/unit/test_publish_frames.py holds the output to pamqp's,
byte for byte.
"""

import struct

import aiormq

_FRAME_END = b"\xce"
# Frame header: type, channel, payload size. Method payload head: Basic (60), Publish (40),
# the reserved short.
_FRAME_HEAD = struct.Struct(">BHI")
_PUBLISH_HEAD = struct.Struct(">HHH").pack(60, 40, 0)
_CONTENT_HEAD = struct.Struct(">HHQ")
_METHOD, _HEADER, _BODY = 1, 2, 3


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_HEAD.pack(kind, channel, len(payload)) + payload + _FRAME_END


def _shortstr(value: str) -> bytes:
    encoded = value.encode()
    if len(encoded) > 255:
        raise ValueError(f"{value[:40]!r}... is longer than an AMQP short string (255 bytes)")
    return bytes((len(encoded),)) + encoded


def publish_frames(
    channel: int,
    max_body: int,
    body: bytes,
    exchange: str,
    routing_key: str,
    properties: aiormq.spec.Basic.Properties,
    mandatory: bool,
) -> bytes:
    """The frames of one basic.publish, as pamqp writes them (tests/unit compare the two),
    without pamqp's per-frame validation and objects: this runs for every reply. Body frames
    carry at most `max_body` bytes each (0 or less: no limit, RabbitMQ's frame_max 0)."""
    method = _PUBLISH_HEAD + _shortstr(exchange) + _shortstr(routing_key)
    method += b"\x01" if mandatory else b"\x00"
    size = len(body)
    parts: list[bytes | memoryview] = [
        _frame(_METHOD, channel, method),
        _frame(_HEADER, channel, _CONTENT_HEAD.pack(60, 0, size) + properties.marshal()),
    ]
    step = max_body if max_body > 0 else max(size, 1)
    view = memoryview(body)
    for start in range(0, size, step):
        chunk = view[start : start + step]
        # Slices of the body go into the one join: the body is copied once here.
        parts += (_FRAME_HEAD.pack(_BODY, channel, len(chunk)), chunk, _FRAME_END)
    return b"".join(parts)
