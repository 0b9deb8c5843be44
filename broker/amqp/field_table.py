"""AMQP 0-9-1 field tables (RabbitMQ's dialect), written faithfully, and walked as raw bytes.

pamqp's own encoder is lossy or fails on tables it decoded itself: a non-UTF-8 longstr comes
back as bytes, which it cannot encode (TypeError); every Python float goes out as a 32-bit
'f' (1e300 overflows, other doubles lose precision); keys over 128 bytes are cut. A dead
letter must carry the producer's headers unchanged, so Swarm writes its tables itself:
bytes as byte arrays ('x'), floats as doubles ('d'), keys whole (up to 255 bytes),
datetimes as timestamps ('T'), Decimals as decimals ('D'), nested tables and arrays
recursively.

A table here is a list of entries, each `(key, entry bytes)`: the key as raw bytes, the
entry as it goes on the wire (key, type tag, value). Entries are what the dead letter's size
rules drop and splice, and a raw table as it arrived (`Delivery.raw_headers`) splits into
them without decoding anything.
"""

import datetime
import decimal
import struct
from collections.abc import Iterable, Mapping
from typing import Any

SHORTSTR_MAX = 255
TableEntry = tuple[bytes, bytes]

_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")
_UINT32 = struct.Struct(">I")
_UINT64 = struct.Struct(">Q")
_DOUBLE = struct.Struct(">d")

# Value sizes after the type tag: fixed ones, and those prefixed by a 32-bit length.
_FIXED_SIZES = {
    ord("t"): 1,
    ord("b"): 1,
    ord("B"): 1,
    ord("s"): 2,
    ord("u"): 2,
    ord("I"): 4,
    ord("i"): 4,
    ord("l"): 8,
    ord("L"): 8,
    ord("f"): 4,
    ord("d"): 8,
    ord("D"): 5,
    ord("T"): 8,
    ord("V"): 0,
}
_LENGTH_PREFIXED = {ord("S"), ord("x"), ord("A"), ord("F")}


class TableError(ValueError):
    """A value that has no faithful AMQP encoding, or raw bytes that are not a table."""


def key_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def encode_entry(key: str | bytes, value: Any) -> TableEntry:
    raw_key = key_bytes(key)
    if len(raw_key) > SHORTSTR_MAX:
        raise TableError(f"key of {len(raw_key)} bytes: at most {SHORTSTR_MAX}")
    return raw_key, bytes((len(raw_key),)) + raw_key + encode_value(value)


def encode_entries(table: Mapping[Any, Any]) -> tuple[list[TableEntry], list[bytes]]:
    """The entries of a decoded table, in its order, and the keys of those that have no
    faithful encoding (left out)."""
    entries: list[TableEntry] = []
    failed: list[bytes] = []
    for key, value in table.items():
        try:
            entries.append(encode_entry(key, value))
        except (TableError, TypeError, ValueError, OverflowError):
            failed.append(key_bytes(key) if isinstance(key, str | bytes) else repr(key).encode())
    return entries, failed


def encode_value(value: Any) -> bytes:
    """Type tag and value. bool before int: a bool is an int in Python."""
    if value is None:
        return b"V"
    if isinstance(value, bool):
        return b"t\x01" if value else b"t\x00"
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return b"I" + _INT32.pack(value)
        if -(2**63) <= value < 2**63:
            return b"l" + _INT64.pack(value)
        raise TableError(f"integer {value} does not fit 64 bits")
    if isinstance(value, float):
        return b"d" + _DOUBLE.pack(value)
    if isinstance(value, str):
        return _sized(b"S", value.encode())
    if isinstance(value, bytes | bytearray | memoryview):
        return _sized(b"x", bytes(value))
    if isinstance(value, decimal.Decimal):
        return b"D" + _decimal(value)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)  # as pamqp decodes them: UTC
        return b"T" + _UINT64.pack(int(value.timestamp()))
    if isinstance(value, Mapping):
        entries, failed = encode_entries(value)
        if failed:
            raise TableError(f"nested table entries without an encoding: {failed!r}")
        return _sized(b"F", b"".join(entry for _, entry in entries))
    if isinstance(value, list | tuple):
        return _sized(b"A", b"".join(encode_value(item) for item in value))
    raise TableError(f"no AMQP field type for {type(value).__name__}")


def _sized(tag: bytes, data: bytes) -> bytes:
    return tag + _UINT32.pack(len(data)) + data


def _decimal(value: decimal.Decimal) -> bytes:
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise TableError(f"decimal {value} is not finite")
    mantissa = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
    if exponent > 0:  # a positive exponent scales the mantissa up
        mantissa, exponent = mantissa * 10**exponent, 0
    scale = -exponent
    if not (0 <= scale <= 255 and -(2**31) <= mantissa < 2**31):
        raise TableError(f"decimal {value} does not fit AMQP's (scale, int32)")
    return bytes((scale,)) + _INT32.pack(mantissa)


def split_table(raw: bytes) -> list[TableEntry]:
    """The entries of a raw table (without its 4-byte length), each byte for byte as it
    arrived. Raises TableError on a type tag this dialect does not know or a short read."""
    entries: list[TableEntry] = []
    offset = 0
    end = len(raw)
    while offset < end:
        start = offset
        key_length = raw[offset]
        offset += 1 + key_length
        if offset >= end:
            raise TableError("table entry cut short after its key")
        key = raw[start + 1 : offset]
        offset = _skip_value(raw, offset)
        if offset > end:
            raise TableError("table entry value cut short")
        entries.append((key, raw[start:offset]))
    return entries


def _skip_value(raw: bytes, offset: int) -> int:
    """The offset just past the value whose type tag is at `offset`."""
    tag = raw[offset]
    offset += 1
    size = _FIXED_SIZES.get(tag)
    if size is not None:
        return offset + size
    if tag in _LENGTH_PREFIXED:
        if offset + 4 > len(raw):
            raise TableError("length cut short")
        return offset + 4 + int(_UINT32.unpack_from(raw, offset)[0])
    raise TableError(f"unknown field type {chr(tag)!r}")


def table_bytes(entries: Iterable[TableEntry]) -> bytes:
    return b"".join(entry for _, entry in entries)
