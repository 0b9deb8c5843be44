"""Building reply bodies: from a rejection, or from a run's outcome with its result bytes."""

from schemas.codec import encode
from schemas.reply import ErrorInfo, Reply, Timing

_NIL = b"\xc0"


def encode_reply(reply: Reply, result_payload: bytes | None = None) -> bytes:
    """Encode `reply`; when `result_payload` (msgpack bytes) is given it becomes `result`.

    The result was encoded in the actor; rather than decode and encode it again, the reply is
    encoded with `result` last and nil, and the nil byte is swapped for the payload.
    """
    fields = reply.wire_dict()
    if result_payload is None:
        return encode(fields)
    fields.pop("result")
    fields["result"] = None
    body = encode(fields)
    return body[: -len(_NIL)] + result_payload


def error_reply(
    task_id: str | None,
    status: str,
    code: str,
    message: str,
    *,
    retryable: bool = False,
    attempts: int = 0,
    pool: str | None = None,
    node: str | None = None,
    queued_ms: float = 0.0,
    run_ms: float = 0.0,
) -> Reply:
    return Reply(
        id=task_id,
        status=status,  # type: ignore[arg-type]
        error=ErrorInfo(code=code, message=message, retryable=retryable),  # type: ignore[arg-type]
        attempts=attempts,
        pool=pool,
        node=node,
        timing=Timing(queued_ms=queued_ms, run_ms=run_ms),
    )
