"""A handler's traceback: bounded with its end kept, and one line on the console."""

import io
import sys

import structlog

from broker.logging import configure_logging
from workers.outcome import TRACEBACK_MAX_CHARS, bounded_traceback


def _raise_deep(depth: int) -> None:
    if depth == 0:
        raise ValueError("the innermost error")
    _raise_deep(depth - 1)


def _caught(depth: int) -> BaseException:
    try:
        _raise_deep(depth)
    except ValueError as exc:
        return exc
    raise AssertionError("did not raise")


def test_a_short_traceback_is_kept_whole() -> None:
    text = bounded_traceback(_caught(2))
    assert text.startswith("Traceback (most recent call last):")
    assert text.endswith("ValueError: the innermost error")
    assert text.count("in _raise_deep") == 3


def test_a_long_traceback_keeps_its_end_within_the_bound() -> None:
    text = bounded_traceback(ValueError("x" * 20_000 + " the end"))
    assert len(text) == TRACEBACK_MAX_CHARS
    assert text.startswith("...\n") and text.endswith("x the end")


def test_the_console_writes_a_traceback_field_on_one_line(monkeypatch: object) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)  # type: ignore[attr-defined]
    processors = structlog.get_config()
    try:
        configure_logging("console")
        structlog.get_logger("t").error("handler_failed", traceback="line one\nline two")
    finally:
        structlog.configure(**processors)
    # structlog's console renderer writes a str field's repr: its newlines escaped.
    assert out.getvalue().count("\n") == 1
    assert "line one\\nline two" in out.getvalue()
