"""What one run returns from an actor: plain data, so the broker needs no Ray types."""

import traceback
from dataclasses import dataclass


@dataclass(frozen=True)
class RunOutcome:
    """The result of one handler call.

    `payload` is the msgpack encoding of the return value, made inside the actor so that a
    value msgpack cannot carry fails there, as the handler's error, and the daemon splices the
    bytes into the reply without decoding them again.
    """

    ok: bool
    payload: bytes | None = None
    error_code: str | None = None
    error_message: str | None = None
    run_ms: float = 0.0
    # Set when the handler raised workers.signals.Retry: run again after this delay.
    retry_delay_s: float | None = None
    # The traceback of the exception the handler raised, its last TRACEBACK_MAX_CHARS: for
    # the daemon's log line and the dead letter, never for the reply (which stays short).
    traceback: str | None = None


TRACEBACK_MAX_CHARS = 8192


def bounded_traceback(exc: BaseException) -> str:
    """`exc`'s formatted traceback, its end kept when longer than TRACEBACK_MAX_CHARS (the
    innermost frames and the exception say the most)."""
    text = "".join(traceback.format_exception(exc)).rstrip("\n")
    if len(text) <= TRACEBACK_MAX_CHARS:
        return text
    return "...\n" + text[-(TRACEBACK_MAX_CHARS - 4) :]
