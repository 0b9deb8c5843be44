"""The daemon's frame decoding: strict first, tolerant when that fails.

Why: aiormq decodes every frame in its connection's reader task. A content header that pamqp
cannot decode (a header timestamp past the year 9999, a header key or a short string that is
not UTF-8: RabbitMQ passes them through) raises there, the reader dies and the connection with
it, RabbitMQ redelivers the message to the next connection, and that one dies the same way:
every queue of the daemon stops until someone purges the message.

How: pamqp hands each content-header frame to `pamqp.frame._unmarshal_header_frame` (and each
method frame to `_unmarshal_method_frame`), which `install()` wraps, once per process. Only
connections opened inside `tolerant_frames()` take the new path: the context variable is set
while the daemon connects, and the reader task aiormq starts then inherits it; every other
connection (the client's, a test's) decodes as pamqp always did. On the new path the strict
decoder runs first (the happy path's cost is a slice of the headers table); only when it
raises is the header salvaged field by field (`broker.amqp.salvage`), keeping the body size so the
body frames still assemble.

Method frames take the same path: a Basic.Deliver whose routing key is not UTF-8 (a
producer's `CC` header routes a message under any key) is read with the key escaped.

What travels to the ingress: a `FrameExtras` put in the properties' `cluster_id`, the one
property aio-pika hands on untouched (a deprecated field, kept in `FrameExtras.cluster_id`). A
producer cannot forge it: every value a producer can send decodes to a str there, never to a
`FrameExtras`.
"""

import contextlib
import contextvars
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pamqp.frame
from pamqp.base import Frame
from pamqp.header import ContentHeader

from broker.amqp.salvage import lenient_method, salvage_content_header, values_over

_HEADERS_FLAG = 1 << 13
_CONTENT_TYPE_FLAG = 1 << 15
_CONTENT_ENCODING_FLAG = 1 << 14
_MORE_FLAGS = 1
_MAX_PROBLEMS = 5
# A headers table of more values than this is refused undecoded (see `_too_many_values`).
# Counted only in tables over _LARGE_TABLE_BYTES: a smaller one cannot hold that many (every
# value takes at least its type tag, every entry a key length too).
MAX_HEADER_VALUES = 1024
_LARGE_TABLE_BYTES = 1024

_tolerant = contextvars.ContextVar("swarm_tolerant_frames", default=False)
_strict_decode: Callable[[bytes], ContentHeader] | None = None
_strict_method: Callable[[bytes], Frame] | None = None


@dataclass(frozen=True, slots=True)
class FrameExtras:
    """What the daemon's decoder learnt about one content header beyond its properties."""

    # The headers table as it arrived, without its 4-byte length prefix (None: no headers).
    raw_headers: bytes | None
    # What could not be decoded, in words (None: everything decoded).
    error: str | None
    # The producer's own cluster_id, whose place this object took.
    cluster_id: str | None


def install() -> None:
    """Wrap pamqp's content-header and method decoders (idempotent). Fails loudly if pamqp
    changed."""
    global _strict_decode, _strict_method
    if _strict_decode is not None:
        return
    strict_header = getattr(pamqp.frame, "_unmarshal_header_frame", None)
    strict_method = getattr(pamqp.frame, "_unmarshal_method_frame", None)
    if strict_header is None or strict_method is None:
        raise RuntimeError("pamqp's frame decoders moved: broker/amqp/frames.py needs updating")
    _strict_decode, _strict_method = strict_header, strict_method
    pamqp.frame._unmarshal_header_frame = _decode_content_header
    pamqp.frame._unmarshal_method_frame = _decode_method


@contextlib.contextmanager
def tolerant_frames() -> Iterator[None]:
    """Connections opened inside this block decode content headers and delivery methods
    tolerantly (the reader task aiormq starts for them inherits the context)."""
    install()
    token = _tolerant.set(True)
    try:
        yield
    finally:
        _tolerant.reset(token)


def frame_extras(message: object) -> FrameExtras | None:
    """The extras of a delivered aio-pika message, when the daemon's decoder attached them."""
    value = getattr(message, "cluster_id", None)
    return value if isinstance(value, FrameExtras) else None


def _decode_content_header(frame_data: bytes) -> ContentHeader:
    assert _strict_decode is not None
    if not _tolerant.get():
        return _strict_decode(frame_data)
    raw = _raw_headers(frame_data)
    if raw is not None and len(raw) > _LARGE_TABLE_BYTES and values_over(raw, MAX_HEADER_VALUES):
        refused = _too_many_values(frame_data)
        if refused is not None:
            return refused
    try:
        header = _strict_decode(frame_data)
    except Exception as exc:  # pamqp's UnmarshalingException, and what it lets through
        return _salvaged(frame_data, exc)
    if raw is not None:
        _attach(header, FrameExtras(raw, None, header.properties.cluster_id))
    return header


def _decode_method(frame_data: bytes) -> Frame:
    """A delivery whose routing key is not UTF-8 (a producer's `CC` header routes it) would
    kill the reader as surely as a bad property: its short strings are read escaped."""
    assert _strict_method is not None
    if not _tolerant.get():
        return _strict_method(frame_data)
    try:
        return _strict_method(frame_data)
    except Exception as strict_error:
        try:
            method = lenient_method(frame_data)
        except (ValueError, struct.error, IndexError):
            method = None
        if method is None:
            raise strict_error from None
        return method


def _salvaged(frame_data: bytes, strict_error: Exception) -> ContentHeader:
    try:
        salvage = salvage_content_header(frame_data)
    except (ValueError, struct.error, IndexError):
        # Not even the body size or the flags: a broken frame, not a bad property. RabbitMQ
        # does not relay such frames; fail as pamqp did.
        raise strict_error from None
    problems = salvage.problems or [f"{type(strict_error).__name__}: {strict_error}"]
    error = "; ".join(problems[:_MAX_PROBLEMS])
    if len(problems) > _MAX_PROBLEMS:
        error += f"; and {len(problems) - _MAX_PROBLEMS} more"
    header = salvage.header
    _attach(header, FrameExtras(salvage.raw_headers, error, header.properties.cluster_id))
    return header


def _too_many_values(frame_data: bytes) -> ContentHeader | None:
    """A headers table of more values than anyone needs is not decoded at all: pamqp's
    decoder takes time in the square of its size (a 128 KB table of one-byte values held the
    event loop for a second). The task is answered malformed, the table kept raw."""
    try:
        salvage = salvage_content_header(frame_data, decode_headers=False)
    except (ValueError, struct.error, IndexError):
        return None  # a broken frame: the strict decoder says so
    error = (
        f"headers: more than {MAX_HEADER_VALUES} values (entries, array elements and nested "
        "entries); not decoded"
    )
    header = salvage.header
    _attach(header, FrameExtras(salvage.raw_headers, error, header.properties.cluster_id))
    return header


def _attach(header: ContentHeader, extras: FrameExtras) -> None:
    # setattr: pamqp types cluster_id as a str; aio-pika copies whatever is there.
    setattr(header.properties, "cluster_id", extras)  # noqa: B010


def _raw_headers(frame_data: bytes) -> bytes | None:
    """The headers table's bytes of a content header that decoded: skip the class, weight,
    body size and flags, then content_type and content_encoding, the two short strings that
    come before it."""
    flags = int.from_bytes(frame_data[12:14], "big")
    if not flags & _HEADERS_FLAG:
        return None
    position = 14
    word = flags
    while word & _MORE_FLAGS:  # Basic's flags fit one word; a producer may still send more
        word = int.from_bytes(frame_data[position : position + 2], "big")
        position += 2
    if flags & _CONTENT_TYPE_FLAG:
        position += 1 + frame_data[position]
    if flags & _CONTENT_ENCODING_FLAG:
        position += 1 + frame_data[position]
    length = int.from_bytes(frame_data[position : position + 4], "big")
    return frame_data[position + 4 : position + 4 + length]
