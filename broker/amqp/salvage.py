"""Reading frames that pamqp's strict decoder refused: content headers field by field, and the
delivery methods whose short strings a producer chooses.

A hostile or buggy producer can send properties RabbitMQ passes through but pamqp cannot decode:
a short string or header key that is not UTF-8, a timestamp past the year 9999. Every AMQP field
says how long it is before what it holds, so one bad field can be stepped over: each property,
and each entry of the headers table, is decoded on its own, and what fails is left out and named.
The body size always survives, so the body frames that follow still assemble into the message.
"""

import struct
from dataclasses import dataclass, field
from typing import Any

from pamqp import commands, decode
from pamqp.base import Frame
from pamqp.header import ContentHeader

PROPERTIES = commands.Basic.Properties
# aio-pika's name for the one property pamqp names differently: problems are reported in the
# names `Delivery.properties` uses.
_PUBLIC_NAMES = {"message_type": "type"}

# Bytes after the type tag of each fixed-size field-table value (AMQP 0-9-1 as RabbitMQ reads
# it: 4.2.5.5 and the errata); S, x, A and F carry a 4-byte length instead.
_FIXED_VALUE_SIZES = {
    b"t": 1,
    b"b": 1,
    b"B": 1,
    b"s": 2,
    b"u": 2,
    b"I": 4,
    b"i": 4,
    b"f": 4,
    b"D": 5,
    b"l": 8,
    b"L": 8,
    b"d": 8,
    b"T": 8,
    b"V": 0,
    b"\x00": 0,
}
_LENGTH_PREFIXED = frozenset((b"S", b"x", b"A", b"F"))
_MAX_SHOWN = 40  # bytes of an undecodable key shown in a problem


@dataclass
class Salvage:
    """What could be read of a content header: the header (undecodable properties and header
    entries left out), the raw headers table if it was whole, and each problem in words."""

    header: ContentHeader
    raw_headers: bytes | None = None
    problems: list[str] = field(default_factory=list)


def salvage_content_header(frame_data: bytes, *, decode_headers: bool = True) -> Salvage:
    """Decode a content header frame's payload property by property. Raises ValueError (or
    struct.error) only when even its shape cannot be read: no body size, no property flags.
    With `decode_headers` false the headers table is kept raw and not decoded at all."""
    class_id, weight, body_size = struct.unpack_from(">HHQ", frame_data)
    consumed, flags = ContentHeader._get_flags(frame_data[12:])
    properties = PROPERTIES()
    salvage = Salvage(ContentHeader(weight, body_size, properties))
    salvage.header.class_id = class_id
    position = 12 + consumed
    for name in PROPERTIES.__slots__:
        if not flags & PROPERTIES.flags[name]:
            continue
        label = _PUBLIC_NAMES.get(name, name)
        amqp_type = getattr(PROPERTIES, "_" + name)
        end = _property_end(amqp_type, frame_data, position)
        if end is None:
            salvage.problems.append(f"{label}: truncated; the properties after it are unread")
            break
        value: Any = None
        if amqp_type == "table":
            salvage.raw_headers = frame_data[position + 4 : end]
            if decode_headers:
                value = _salvage_table(salvage.raw_headers, salvage.problems)
        else:
            try:
                _, value = decode.by_type(frame_data[position:end], amqp_type)
            except Exception as exc:  # UnicodeDecodeError, year out of range, OverflowError
                salvage.problems.append(f"{label}: {exc}")
        setattr(properties, name, value)
        position = end
    return salvage


def _property_end(amqp_type: str, data: bytes, position: int) -> int | None:
    """Where a property that starts at `position` ends, or None when the frame is too short."""
    if amqp_type == "shortstr":
        end = position + 1 + data[position] if position < len(data) else len(data) + 1
    elif amqp_type == "table":
        if position + 4 > len(data):
            return None
        end = position + 4 + int.from_bytes(data[position : position + 4], "big")
    elif amqp_type == "octet":
        end = position + 1
    elif amqp_type == "timestamp":
        end = position + 8
    else:  # Basic's properties have no other types
        return None
    return end if end <= len(data) else None


def _salvage_table(table: bytes, problems: list[str]) -> dict[str, Any]:
    """The entries of a field table (its bytes without the length prefix) that decode; each
    that does not is named in `problems`. An unknown type tag ends the walk: nothing says how
    long its value is."""
    entries: dict[str, Any] = {}
    position = 0
    while position < len(table):
        key_end = position + 1 + table[position]
        raw_key = table[position + 1 : key_end]
        value_end = _value_end(table, key_end)
        if value_end is None:
            problems.append(
                f"headers: the value after key {raw_key[:_MAX_SHOWN]!r} has an unknown type "
                f"or is truncated; the entries after it are unread"
            )
            break
        value_bytes = table[key_end:value_end]
        position = value_end
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"headers: a key that is not UTF-8: {raw_key[:_MAX_SHOWN]!r}")
            continue
        try:
            _, entries[key] = decode.embedded_value(value_bytes)
        except Exception as exc:  # year out of range, bad nested keys, truncated nesting
            problems.append(f"headers[{key!r}]: {exc}")
    return entries


def _value_end(table: bytes, position: int) -> int | None:
    """Where the tagged field value at `position` ends, or None if unknown or truncated."""
    tag = table[position : position + 1]
    size = _FIXED_VALUE_SIZES.get(tag)
    if size is not None:
        end = position + 1 + size
    elif tag in _LENGTH_PREFIXED and position + 5 <= len(table):
        end = position + 5 + int.from_bytes(table[position + 1 : position + 5], "big")
    else:
        return None
    return end if end <= len(table) else None


def values_over(table: bytes, limit: int) -> bool:
    """True when the table (its bytes without the length prefix) holds more than `limit`
    values, counting the entries of nested tables and the elements of arrays. One linear
    walk without decoding (pamqp's decoder copies the rest of a table for every entry, so a
    table of many tiny values costs the square of its size); unreadable parts end the walk
    of their container (decoding reports them)."""
    count = 0
    stack: list[tuple[bytes, bool]] = [(table, True)]  # (bytes, is a table: entries have keys)
    while stack:
        data, keyed = stack.pop()
        position = 0
        while position < len(data):
            if keyed:
                position += 1 + data[position]
            end = _value_end(data, position)
            if end is None:
                break
            count += 1
            if count > limit:
                return True
            tag = data[position : position + 1]
            if tag in (b"A", b"F"):
                stack.append((data[position + 5 : end], tag == b"F"))
            position = end
    return False


# Methods that carry a producer's routing key to a consumer: with a `CC` header a producer can
# route a message under any routing key, bytes that are not UTF-8 included.
LENIENT_METHODS = frozenset(
    cls.index for cls in (commands.Basic.Deliver, commands.Basic.Return, commands.Basic.GetOk)
)


def lenient_method(frame_data: bytes) -> Frame | None:
    """A delivery method (Deliver, Return, GetOk) decoded with its short strings read as
    UTF-8 with undecodable bytes escaped (b"key\\xff" becomes "key\\\\xff"); None for any
    other method. The daemon does not route on these strings, so escaping loses nothing."""
    index = int.from_bytes(frame_data[0:4], "big")
    if index not in LENIENT_METHODS:
        return None
    method: Frame = commands.INDEX_MAPPING[index]()
    data = frame_data[4:]
    bit, in_bits = 0, False
    for name in method.__slots__:  # as pamqp's Frame.unmarshal, but for short strings
        amqp_type = method.amqp_type(name)
        if in_bits and (amqp_type != "bit" or bit == 8):
            data, bit, in_bits = data[1:], 0, False
        if amqp_type == "shortstr":
            consumed = 1 + data[0]
            value: Any = data[1:consumed].decode("utf-8", "backslashreplace")
        else:
            consumed, value = decode.by_type(data, amqp_type, bit)
        if amqp_type == "bit":
            bit, in_bits, consumed = bit + 1, True, 0
        setattr(method, name, value)
        data = data[consumed:]
    return method
