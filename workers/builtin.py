"""Built-in handlers registered on every daemon for all task types: health checks and benchmarks."""

import asyncio
from typing import Any

from workers.registry import handler


class HandlerFailure(Exception):
    """What `fail` raises: an ordinary handler exception, reported as `handler_error`."""


@handler("echo", blocking=False)
def echo(args: Any) -> Any:
    """Return `args` unchanged."""
    return args


@handler("sleep")
async def sleep(args: Any) -> Any:
    """Wait `args.seconds`, then return `args`."""
    seconds = args.get("seconds", 0) if isinstance(args, dict) else 0
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        raise ValueError("sleep needs args.seconds, a number >= 0")
    await asyncio.sleep(seconds)
    return args


@handler("fail")
def fail(args: Any) -> Any:
    """Raise with `args.message`."""
    message = args.get("message", "fail was asked to fail") if isinstance(args, dict) else None
    raise HandlerFailure(str(message or "fail was asked to fail"))
