"""W3C Trace Context (https://www.w3.org/TR/trace-context/) across the broker.

A task message may carry a `traceparent` header (and `tracestate`). The daemon's handling of
the task is a span of that trace: its logs carry `trace_id` and `span_id`, and the reply,
the progress messages and the `swarm.results` copy carry `traceparent` naming that span as
the parent, so a tracing system stitches producer, broker and consumer together. A task
without the header, or with a malformed one, is handled as before: no trace is invented.
"""

import re
import secrets
from dataclasses import dataclass

TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True)
class TraceContext:
    trace_id: str
    span_id: str
    flags: str
    tracestate: str | None = None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> "TraceContext":
        """A new span of the same trace: the daemon's handling of the task."""
        return TraceContext(self.trace_id, secrets.token_hex(8), self.flags, self.tracestate)

    def headers(self) -> dict[str, str]:
        headers = {TRACEPARENT_HEADER: self.traceparent}
        if self.tracestate:
            headers[TRACESTATE_HEADER] = self.tracestate
        return headers


def parse(traceparent: object, tracestate: object = None) -> TraceContext | None:
    """The trace context of a `traceparent` value, or None when it is absent or invalid."""
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("ascii", errors="replace")
    if not isinstance(traceparent, str):
        return None
    match = _TRACEPARENT.match(traceparent.strip().lower())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    # Version ff is forbidden; version 00 has nothing after the flags. Later versions may.
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE:
        return None
    if span_id == _ZERO_SPAN:
        return None
    state = tracestate.decode(errors="replace") if isinstance(tracestate, bytes) else tracestate
    return TraceContext(trace_id, span_id, flags, state if isinstance(state, str) else None)
