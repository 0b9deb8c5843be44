"""What Swarm publishes must fit one content-header frame, and the reply's rule for making it.

RabbitMQ closes the whole connection (FRAME_ERROR) on a content-header frame larger than the
negotiated `frame_max`, and every publish of that message would do it again. The header
frame's payload is 12 bytes (class, weight, body size) plus the encoded properties, inside
the 8 bytes of the frame's own envelope, so the properties get `frame_max - 20` bytes.

The reply's rule: when its properties do not fit, `tracestate` is dropped, then
`traceparent`; `x-swarm-status` and `correlation_id` always stay. What was dropped is named
in the reply's `x-swarm-headers-truncated` header (comma-separated). A `correlation_id` that
defaults to a task id over 255 bytes of UTF-8 (an AMQP short string's limit) is cut to 255
bytes on a character boundary, and `correlation_id` is named there too.
"""

import struct
from typing import Any

import aiormq

from broker.ops.tracing import TRACEPARENT_HEADER, TRACESTATE_HEADER
from schemas.topology import CONTENT_TYPE, TRUNCATED_HEADER

PERSISTENT = 2
SHORTSTR_MAX = 255

# Frame envelope (type, channel, size, end marker) and the content header's fixed fields.
HEADER_FRAME_OVERHEAD = 8 + 12
# aiormq sets a random 32-hex-digit message_id on a publish that has none (shortstr: +1).
FILLED_MESSAGE_ID_SIZE = 33
# Reply headers dropped, in this order, until the reply fits.
REPLY_DROP_ORDER = (TRACESTATE_HEADER, TRACEPARENT_HEADER)
# Above this many characters of string data, a reply's size is checked exactly: below it,
# even at 4 bytes per character, nothing can reach the smallest frame_max (4096) that
# RabbitMQ negotiates. Keeps the hot path to a few len() calls.
_CHEAP_CHECK_CHARS = 800


def fit_shortstr(text: str | None) -> str | None:
    """A property (an AMQP shortstr) holds 255 bytes of UTF-8, and a task id of 128
    characters can take 512: longer text is cut on a character boundary."""
    if text is None or len(text) * 4 <= SHORTSTR_MAX:
        return text
    raw = text.encode()
    return text if len(raw) <= SHORTSTR_MAX else raw[:SHORTSTR_MAX].decode(errors="ignore")


def properties_budget(frame_max: int) -> int:
    """Bytes the encoded properties may take; frame_max 0 means no limit."""
    return (frame_max or 2**32) - HEADER_FRAME_OVERHEAD


def properties_size(properties: aiormq.spec.Basic.Properties) -> int:
    size = len(properties.marshal())
    return size if properties.message_id else size + FILLED_MESSAGE_ID_SIZE


class EncodedHeadersProperties(aiormq.spec.Basic.Properties):
    """Basic.Properties whose headers table goes out as the given bytes: pamqp's
    `ContentHeader.marshal` calls `properties.marshal()`, which encodes each property with
    `encode_property`, so this is the one place the table is written."""

    def __init__(self, table: bytes, **properties: Any) -> None:
        # The placeholder only makes marshal() set the headers flag; it is never encoded.
        super().__init__(headers={"": ""} if table else None, **properties)
        self.table = table

    def encode_property(self, name: str, value: Any) -> bytes:
        if name == "headers":
            return struct.pack(">I", len(self.table)) + self.table
        return super().encode_property(name, value)


def reply_properties_for(
    correlation_id: str | None, headers: dict[str, Any]
) -> aiormq.spec.Basic.Properties:
    return aiormq.spec.Basic.Properties(
        content_type=CONTENT_TYPE,
        correlation_id=correlation_id,
        headers=headers,
        delivery_mode=PERSISTENT,
    )


def reply_headers(
    correlation_id: str | None, headers: dict[str, Any], budget: int
) -> tuple[dict[str, Any], list[str]]:
    """The reply's headers, made to fit `budget` by the reply's rule; and what was dropped
    (nothing, on the hot path)."""
    chars = len(correlation_id or "") + sum(len(k) + len(str(v)) for k, v in headers.items())
    if chars <= _CHEAP_CHECK_CHARS:
        return headers, []
    dropped: list[str] = []
    table = dict(headers)
    for name in REPLY_DROP_ORDER:
        if properties_size(reply_properties_for(correlation_id, table)) <= budget:
            break
        if table.pop(name, None) is not None:
            dropped.append(name)
            table[TRUNCATED_HEADER] = ",".join(dropped)
    return table, dropped
