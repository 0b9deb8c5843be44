"""broker.amqp.field_table, broker.amqp.dead_letter and broker.amqp.frame_fit: tables written
faithfully, dead letters and replies made to fit one frame. Pure: decoded back with pamqp, as a
consumer would."""

import datetime
import decimal
import struct
import time
from typing import Any

from pamqp import frame, header

from broker.amqp.dead_letter import build_dead_letter
from broker.amqp.field_table import encode_entries, split_table, table_bytes
from broker.amqp.frame_fit import (
    EncodedHeadersProperties,
    properties_budget,
    properties_size,
    reply_headers,
    reply_properties_for,
)
from broker.tasks.delivery import Delivery
from schemas.topology import (
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    TRACEBACK_HEADER,
    TRUNCATED_HEADER,
)

BUDGET = properties_budget(131072)
HOSTILE: dict[str, Any] = {
    "k" * 200: "a key pamqp would cut to 128 bytes",
    "huge": 1e300,
    "third": 1 / 3,
    "raw": b"\xff\xfe not utf-8",
    "text": "héllo",
    "none": None,
    "yes": True,
    "small": -5,
    "wide": 2**40,
    "price": decimal.Decimal("3.14"),
    "at": datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
    "nested": {"list": [1, "x", 2.5, b"\x00"]},
}


def received(properties: EncodedHeadersProperties) -> Any:
    """The properties as a consumer decodes them off the wire."""
    wire = frame.marshal(header.ContentHeader(body_size=1, properties=properties), 1)
    _, _, decoded = frame.unmarshal(wire)
    assert isinstance(decoded, header.ContentHeader)
    return decoded.properties


def delivery(headers: dict[str, Any], raw: bytes | None = None, **properties: Any) -> Delivery:
    return Delivery(
        body=b"body",
        queue="swarm.tasks.inference",
        task_type="inference",
        properties={"headers": headers, "content_type": "application/msgpack", **properties},
        redelivered=False,
        received_at_s=time.monotonic(),
        raw_headers=raw,
    )


def swarm(message: str = "it failed") -> dict[str, Any]:
    return {ERROR_CODE_HEADER: "handler_error", ERROR_MESSAGE_HEADER: message}


def test_a_decoded_table_is_written_back_without_loss() -> None:
    entries, failed = encode_entries(HOSTILE)
    assert failed == []
    raw = table_bytes(entries)
    assert split_table(raw) == entries
    assert received(EncodedHeadersProperties(raw, message_id="m")).headers == HOSTILE


def test_raw_entries_are_spliced_unchanged_and_swarm_keys_override_them() -> None:
    raw = (
        b"\x04blobS"
        + struct.pack(">I", 3)
        + b"\xff\x00\xfe"  # a longstr that is not UTF-8
        + b"\x12x-swarm-error-codeS"
        + struct.pack(">I", 6)
        + b"forged"
    )
    letter = build_dead_letter(delivery({}, raw), "t1", swarm(), BUDGET)
    table = letter.properties.table
    assert table.startswith(raw[: 1 + 4 + 1 + 4 + 3])  # the original entry, byte for byte
    headers = received(letter.properties).headers
    assert headers["blob"] == b"\xff\x00\xfe"
    assert headers[ERROR_CODE_HEADER] == "handler_error"
    assert table.count(b"x-swarm-error-code") == 1
    assert letter.truncated == ()


def test_without_raw_headers_the_decoded_table_is_written_faithfully() -> None:
    letter = build_dead_letter(delivery(HOSTILE), "t1", swarm(), BUDGET)
    headers = received(letter.properties).headers
    assert {key: headers[key] for key in HOSTILE} == HOSTILE
    assert received(letter.properties).message_id == "t1"


def test_a_dead_letter_over_the_frame_cuts_the_message_then_the_largest_headers() -> None:
    headers = {f"h{i:03d}": "v" * 990 for i in range(130)} | {"big": "w" * 2000}
    letter = build_dead_letter(delivery(headers), "t1", swarm("m" * 5000), BUDGET)
    assert properties_size(letter.properties) <= BUDGET
    decoded = received(letter.properties).headers
    truncated = decoded[TRUNCATED_HEADER].split(",")
    assert truncated[:2] == [ERROR_MESSAGE_HEADER, "big"]
    assert len(decoded[ERROR_MESSAGE_HEADER]) == 256
    assert all(decoded.get(key) == value or key in truncated for key, value in headers.items())


def test_a_stripped_dead_letter_keeps_only_swarm_headers_and_the_ids() -> None:
    letter = build_dead_letter(
        delivery({"a": 1}, reply_to="q", correlation_id="c"), "t1", swarm(), BUDGET, stripped=True
    )
    properties = received(letter.properties)
    assert properties.reply_to is None and properties.correlation_id == "c"
    assert properties.headers[TRUNCATED_HEADER] == "a"
    assert "a" not in properties.headers


def test_a_reply_drops_tracestate_then_traceparent_and_keeps_status_and_correlation_id() -> None:
    trace = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "tracestate": "s" * 5000}
    headers = {"x-swarm-status": "ok", **trace}
    kept, dropped = reply_headers("c" * 128, headers, 4096 - 20)
    assert dropped == ["tracestate"] and kept[TRUNCATED_HEADER] == "tracestate"
    assert kept["traceparent"] == trace["traceparent"] and kept["x-swarm-status"] == "ok"
    assert properties_size(reply_properties_for("c" * 128, kept)) <= 4096 - 20
    assert reply_headers("c", {"x-swarm-status": "ok"}, 4096 - 20) == (
        {"x-swarm-status": "ok"},
        [],
    )


def test_a_task_id_over_255_bytes_is_cut_on_a_character_for_the_message_id() -> None:
    letter = build_dead_letter(delivery({}), "é" * 128, swarm(), BUDGET)
    assert received(letter.properties).message_id == "é" * 127


def test_a_property_that_cannot_be_encoded_again_is_left_out_and_named() -> None:
    salvaged = delivery({"x-swarm-headers-truncated": "forged"}, delivery_mode=7, priority=300)
    letter = build_dead_letter(salvaged, "t1", swarm(), BUDGET)
    properties = received(letter.properties)
    assert properties.delivery_mode is None and properties.priority is None
    assert properties.headers[TRUNCATED_HEADER] == "delivery_mode,priority"
    assert letter.properties.table.count(TRUNCATED_HEADER.encode()) == 1


def test_values_are_counted_in_nested_tables_and_arrays_without_decoding() -> None:
    from broker.amqp.salvage import values_over

    def entry(key: bytes, value: bytes) -> bytes:
        return bytes([len(key)]) + key + value

    def sized(tag: bytes, data: bytes) -> bytes:
        return tag + len(data).to_bytes(4, "big") + data

    flat = b"".join(entry(b"k%d" % n, b"V") for n in range(10))
    assert not values_over(flat, 10) and values_over(flat, 9)
    # An array of 5 and a table of 3 nested in it: 1 + 5 + 1 + 3 values.
    nested = entry(b"a", sized(b"A", b"V" * 4 + sized(b"F", entry(b"x", b"t\x01") * 3)))
    assert not values_over(nested, 9) and values_over(nested, 8)
    # Undecodable parts end the walk of their container, never raise.
    assert not values_over(entry(b"\xff", b"T" + b"\xff" * 8) + b"\x01k?", 5)
    assert values_over(entry(b"m", sized(b"A", b"V" * 120_000)), 1024)


TRACE = (
    "Traceback (most recent call last):\n"
    + "".join(
        f'  File "handlers.py", line {i}, in step_{i}\n    step_{i + 1}()\n' for i in range(300)
    )
    + "ValueError: the innermost frame and the error come last"
)


def test_a_traceback_that_fits_is_carried_whole() -> None:
    letter = build_dead_letter(
        delivery({"a": 1}), "t1", swarm() | {TRACEBACK_HEADER: TRACE}, BUDGET
    )
    decoded = received(letter.properties).headers
    assert decoded[TRACEBACK_HEADER] == TRACE
    assert TRUNCATED_HEADER not in decoded


def test_a_traceback_is_cut_first_keeping_its_end_when_the_frame_is_short() -> None:
    headers = {f"h{i:03d}": "v" * 990 for i in range(125)}  # leaves room for part of TRACE
    letter = build_dead_letter(
        delivery(headers), "t1", swarm("m" * 300) | {TRACEBACK_HEADER: TRACE}, BUDGET
    )
    assert properties_size(letter.properties) <= BUDGET
    decoded = received(letter.properties).headers
    kept = decoded[TRACEBACK_HEADER]
    assert 256 <= len(kept) < len(TRACE) and TRACE.endswith(kept)
    assert decoded[TRUNCATED_HEADER].split(",") == [TRACEBACK_HEADER]  # nothing else cut
    assert decoded[ERROR_MESSAGE_HEADER] == "m" * 300
    assert all(decoded[key] == value for key, value in headers.items())


def test_a_traceback_without_room_for_its_last_256_bytes_is_left_out() -> None:
    headers = {f"h{i:03d}": "v" * 990 for i in range(130)}
    letter = build_dead_letter(
        delivery(headers), "t1", swarm("m" * 300) | {TRACEBACK_HEADER: TRACE}, BUDGET
    )
    assert properties_size(letter.properties) <= BUDGET
    decoded = received(letter.properties).headers
    assert TRACEBACK_HEADER not in decoded
    assert decoded[TRUNCATED_HEADER].split(",")[0] == TRACEBACK_HEADER


def test_a_stripped_dead_letter_leaves_the_traceback_out() -> None:
    letter = build_dead_letter(
        delivery({}), "t1", swarm() | {TRACEBACK_HEADER: TRACE}, BUDGET, stripped=True
    )
    decoded = received(letter.properties).headers
    assert TRACEBACK_HEADER not in decoded
    assert decoded[TRUNCATED_HEADER] == TRACEBACK_HEADER
