"""What one run returns from an actor: plain data, so the broker needs no Ray types."""

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
