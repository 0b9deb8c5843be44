"""The dead letter of a task: its original body and properties, its headers copied faithfully,
Swarm's own headers appended, and the whole made to fit one content-header frame.

Headers: when the table arrived as raw bytes (`Delivery.raw_headers`), its entries are
spliced unchanged; otherwise the decoded table is written by `broker.amqp.field_table`, never by
pamqp's lossy defaults. Swarm's own entries (`x-swarm-error-code`, ...) come after them, and
an original entry with the same key as one of Swarm's is left out (no duplicate keys).

The dead letter's rule. `x-swarm-error-message` holds at most 4096 characters, as always.
When the properties would not fit the frame (`frame_max - 20` bytes; once anything is cut,
about 1 KB of that is kept for the header that names it):
0. the handler's traceback (`x-swarm-traceback`) loses its beginning, down to its last 256
   bytes, and is left out below that;
1. the error message is shortened to what fits, but not below its first 256 bytes;
2. then original header entries are dropped, largest first, until it fits.
An original property that cannot be written again (salvaged from a malformed header) is
left out. Each is named in `x-swarm-headers-truncated` (comma-separated, in that order, at
most 1 KB of names, then ",..."). A *stripped* dead letter (the last line of defence, see
broker/amqp/outcome_publishing.py) keeps no original header and no traceback, only the
`message_id`, `correlation_id`, `content_type` and `delivery_mode` properties, and 256 bytes
of message.
"""

import datetime
import struct
from dataclasses import dataclass
from typing import Any

import aiormq

from broker.amqp.field_table import (
    TableEntry,
    TableError,
    encode_entries,
    encode_entry,
    key_bytes,
    split_table,
    table_bytes,
)
from broker.amqp.frame_fit import (
    FILLED_MESSAGE_ID_SIZE,
    EncodedHeadersProperties,
    fit_shortstr,
)
from broker.tasks.delivery import Delivery
from schemas.topology import (
    ERROR_MESSAGE_HEADER,
    ORIGINAL_USER_HEADER,
    TRACEBACK_HEADER,
    TRUNCATED_HEADER,
)

# The properties a dead letter keeps (by their aio-pika names, as in Delivery.properties).
# Not `expiration` (it would expire on swarm.dead) nor `user_id` (RabbitMQ refuses another
# user's id: it moves to a header).
KEPT_PROPERTIES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "message_id",
    "timestamp",
    "type",
    "app_id",
)
STRIPPED_PROPERTIES = ("content_type", "delivery_mode", "correlation_id", "message_id")
# Encodes single properties, to check what a salvaged delivery carries.
_PROBE = aiormq.spec.Basic.Properties()
MESSAGE_MAX_CHARS = 4096
MESSAGE_MIN_BYTES = 256
TRUNCATED_LIST_MAX_BYTES = 1024
# What the truncation header can take at most: key, type, length, and its list.
_TRUNCATED_ENTRY_MAX = 1 + len(TRUNCATED_HEADER) + 1 + 4 + TRUNCATED_LIST_MAX_BYTES + 8


@dataclass(frozen=True)
class DeadLetter:
    body: bytes
    properties: EncodedHeadersProperties
    truncated: tuple[str, ...]


def build_dead_letter(
    delivery: Delivery,
    task_id: str | None,
    swarm_headers: dict[str, Any],
    budget: int,
    *,
    stripped: bool = False,
) -> DeadLetter:
    """`swarm_headers` are Swarm's own entries, the error message among them."""
    truncated: list[str] = []  # what was cut or left out, in order
    properties = kept_properties(delivery, task_id, stripped, truncated)
    swarm = dict(swarm_headers)
    user_id = delivery.properties.get("user_id")
    if user_id and not stripped:
        swarm[ORIGINAL_USER_HEADER] = user_id
    message = str(swarm.get(ERROR_MESSAGE_HEADER) or "")[:MESSAGE_MAX_CHARS]
    swarm[ERROR_MESSAGE_HEADER] = message
    own_keys = {key_bytes(key) for key in swarm}
    original = [e for e in original_entries(delivery, truncated) if e[0] not in own_keys]
    if stripped:
        truncated.extend(key.decode(errors="replace") for key, _ in original)
        original = []
        swarm[ERROR_MESSAGE_HEADER] = _cut(message, MESSAGE_MIN_BYTES)
        if swarm[ERROR_MESSAGE_HEADER] != message:
            truncated.append(ERROR_MESSAGE_HEADER)

    trace = swarm.pop(TRACEBACK_HEADER, None)
    if trace and stripped:
        truncated.append(TRACEBACK_HEADER)
        trace = None

    fixed = len(EncodedHeadersProperties(b"", **properties).marshal()) + 4  # + table length
    if not properties.get("message_id"):
        fixed += FILLED_MESSAGE_ID_SIZE
    room = budget - fixed
    trace_entry = None
    if trace:
        trace_entry = _fit_traceback(str(trace), original, swarm, room, truncated)
        if trace_entry is not None:
            room -= len(trace_entry[1])
    original, own = _fit(original, swarm, room, truncated)
    if trace_entry is not None:
        own.append(trace_entry)
    if truncated:
        # Ours names what was cut: a producer's own entry of that name would be a duplicate.
        original = [e for e in original if e[0] != TRUNCATED_HEADER.encode()]
        own.append(encode_entry(TRUNCATED_HEADER, _truncated_list(truncated)))
    table = table_bytes(original + own)
    return DeadLetter(
        delivery.body, EncodedHeadersProperties(table, **properties), tuple(truncated)
    )


def _fit_traceback(
    trace: str, original: list[TableEntry], swarm: dict[str, Any], room: int, truncated: list[str]
) -> TableEntry | None:
    """Step 0 of the rule: the traceback's entry, whole when everything fits, else its end
    in the room the other entries leave (None below MESSAGE_MIN_BYTES)."""
    others = sum(len(entry) for _, entry in original) + sum(
        len(encode_entry(key, value)[1]) for key, value in swarm.items()
    )
    whole = encode_entry(TRACEBACK_HEADER, trace)
    reserve = _TRUNCATED_ENTRY_MAX if truncated else 0
    if others + len(whole[1]) + reserve <= room:
        return whole
    truncated.append(TRACEBACK_HEADER)
    overhead = len(whole[1]) - len(trace.encode())
    left = room - others - _TRUNCATED_ENTRY_MAX - overhead
    if left < MESSAGE_MIN_BYTES:
        return None
    return encode_entry(TRACEBACK_HEADER, _cut_head(trace, left))


def _fit(
    original: list[TableEntry], swarm: dict[str, Any], room: int, truncated: list[str]
) -> tuple[list[TableEntry], list[TableEntry]]:
    """The original entries and Swarm's, within `room` bytes of table by the dead letter's
    rule (the module's docstring); what was cut is appended to `truncated`."""
    own = [encode_entry(key, value) for key, value in swarm.items()]
    # Room for the truncation header, once something is cut.
    reserve = _TRUNCATED_ENTRY_MAX if truncated else 0

    def size(entries: list[TableEntry]) -> int:
        return sum(len(entry) for _, entry in entries) + reserve

    if size(original + own) <= room:
        return original, own
    reserve = _TRUNCATED_ENTRY_MAX
    # 1. The error message, down to MESSAGE_MIN_BYTES.
    message = str(swarm[ERROR_MESSAGE_HEADER])
    others = [e for e in own if e[0] != ERROR_MESSAGE_HEADER.encode()]
    left = room - size(original + others) - (1 + len(ERROR_MESSAGE_HEADER) + 1 + 4)
    shortened = _cut(message, max(MESSAGE_MIN_BYTES, left))
    if shortened != message:
        truncated.append(ERROR_MESSAGE_HEADER)
        own = [
            encode_entry(key, shortened if key == ERROR_MESSAGE_HEADER else value)
            for key, value in swarm.items()
        ]
    # 2. Original entries, largest first.
    total = size(original + own)
    dropped: set[int] = set()
    for index in sorted(range(len(original)), key=lambda i: -len(original[i][1])):
        if total <= room:
            break
        key, entry = original[index]
        dropped.add(index)
        total -= len(entry)
        truncated.append(key.decode(errors="replace"))
    return [e for i, e in enumerate(original) if i not in dropped], own


def original_entries(delivery: Delivery, failed_names: list[str]) -> list[TableEntry]:
    """The task's header entries: raw ones unchanged when present and well formed, else
    the decoded table written faithfully (an entry that cannot be is dropped and named)."""
    if delivery.raw_headers is not None:
        try:
            return split_table(delivery.raw_headers)
        except (TableError, IndexError):
            pass
    headers = delivery.properties.get("headers") or {}
    entries, failed = encode_entries(headers)
    failed_names.extend(key.decode(errors="replace") for key in failed)
    return entries


def kept_properties(
    delivery: Delivery, task_id: str | None, stripped: bool, dropped: list[str]
) -> dict[str, Any]:
    """The properties the dead letter keeps, by pamqp's names. One that cannot be encoded
    again (salvaged from a malformed header: a delivery_mode of 7, a timestamp before 1970)
    is left out and named in `dropped`: it must not stop the dead letter."""
    names = STRIPPED_PROPERTIES if stripped else KEPT_PROPERTIES
    kept: dict[str, Any] = {}
    for name in names:
        value = delivery.properties.get(name)
        if value is None or value == "":
            continue
        pamqp_name = "message_type" if name == "type" else name
        try:
            if name in ("delivery_mode", "priority"):
                value = int(value)
            elif name == "timestamp" and isinstance(value, int | float):
                value = datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
            if name == "delivery_mode" and value not in (1, 2):
                raise ValueError(f"delivery_mode {value}")
            _PROBE.encode_property(pamqp_name, value)
        except (TypeError, ValueError, OverflowError, OSError, struct.error):
            dropped.append(name)
            continue
        kept[pamqp_name] = value
    if "message_id" not in kept and task_id is not None:
        kept["message_id"] = fit_shortstr(task_id)  # the body holds the whole id
    return kept


def _cut(text: str, max_bytes: int) -> str:
    """`text` within `max_bytes` of UTF-8, cut on a character boundary."""
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text
    return raw[: max(0, max_bytes)].decode(errors="ignore")


def _cut_head(text: str, max_bytes: int) -> str:
    """The end of `text` within `max_bytes` of UTF-8, cut on a character boundary."""
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text
    return raw[len(raw) - max(0, max_bytes) :].decode(errors="ignore")


def _truncated_list(names: list[str]) -> str:
    listed = ",".join(names)
    if len(listed.encode()) <= TRUNCATED_LIST_MAX_BYTES:
        return listed
    return _cut(listed, TRUNCATED_LIST_MAX_BYTES - 4) + ",..."
