"""broker.ops.tracing: W3C traceparent parsing and child spans. Pure."""

import pytest

from broker.ops.tracing import parse

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_parses_and_its_child_keeps_the_trace() -> None:
    context = parse(VALID, "vendor=opaque")
    assert context is not None
    assert (context.trace_id, context.span_id, context.flags) == (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
        "01",
    )
    child = context.child()
    assert child.trace_id == context.trace_id and child.flags == "01"
    assert child.span_id != context.span_id and len(child.span_id) == 16
    assert child.headers() == {
        "traceparent": f"00-{context.trace_id}-{child.span_id}-01",
        "tracestate": "vendor=opaque",
    }


def test_bytes_and_upper_case_are_accepted() -> None:
    assert parse(VALID.upper().encode()) is not None


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        "",
        "garbage",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # v00 has no more
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
    ],
)
def test_invalid_values_start_no_trace(value: object) -> None:
    assert parse(value) is None


def test_a_later_version_may_carry_more_fields() -> None:
    assert parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more") is not None
