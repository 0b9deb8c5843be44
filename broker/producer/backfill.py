"""Backfill: send every task of a JSONL file through Swarm, resumably and at a bounded rate.

    async with SwarmClient(url) as swarm:
        summary = await backfill(swarm, Path("tasks.jsonl"), rate_per_s=200, window=64)

One task per line: `{"type", "handler", "args"}` and optionally `"id"` and the contract's other
task keys (`resources`, `pool`, `priority`, `deadline`, `timeout_s`, `max_retries`). A line
without an id gets one derived from its content (`bf-` + sha256 of its canonical JSON), so a
rerun sends the same ids, and the daemon answers an id it already finished with the stored reply
instead of running it again (one outcome per task id). Identical lines without an id are
therefore one task; give them ids to run them twice.

Every id whose final reply arrived (ok or not) is appended to the state file, `<source>.done`
by default, one per line with its reply's status and flushed at once; a rerun skips those ids
without sending them. With `retry_errors`, a rerun sends again the ids whose reply was
`error`, marked as a replay (`x-swarm-replay`): the daemon runs them again although it
stored their error, while an id it answered `ok` is never run twice.
Invalid lines, error replies and replies that never came are appended to
`<source>.errors.jsonl`. Neither stops the run.
"""

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeAlias

from broker.producer.backfill_files import (
    AppendLog,
    count_lines,
    default_errors_path,
    default_state_path,
    derive_id,
    load_done,
    parse_line,
    state_line,
    task_lines,
)
from broker.producer.client import SwarmClient
from broker.producer.ratelimit import TokenBucket
from schemas.reply import Reply
from schemas.task import TaskMessage

__all__ = [
    "BackfillProgress",
    "BackfillSummary",
    "InvalidLine",
    "backfill",
    "default_errors_path",
    "default_state_path",
    "derive_id",
    "parse_line",
]

MAX_TEXT_CHARS = 10_000  # of an invalid line, copied into the errors file
REQUIRED_KEYS = {"v", "id", "type", "handler", "args"}  # send() takes these as arguments

ProgressEvent: TypeAlias = Literal["sent", "skipped", "duplicate", "invalid", "answered", "missing"]


@dataclass(frozen=True)
class InvalidLine:
    """A line that is not JSON, or not a valid task: its 1-based number and why."""

    line: int
    reason: str


@dataclass(frozen=True)
class BackfillProgress:
    """One step of a run (`event` for line `line`) and the run's counts so far."""

    event: ProgressEvent
    line: int
    task_id: str | None
    total: int
    sent: int
    skipped: int
    duplicates: int
    ok: int
    errors: int
    invalid: int
    missing: int

    @property
    def answered(self) -> int:
        """Final replies received (and recorded in the state file) by this run."""
        return self.ok + self.errors

    @property
    def finished(self) -> int:
        """Lines done with: what a progress bar of `total` shows."""
        return self.skipped + self.duplicates + self.invalid + self.answered + self.missing


@dataclass(frozen=True)
class BackfillSummary:
    """What one run did. `complete` is true when every line has a final outcome."""

    lines: int
    sent: int
    skipped: int
    duplicates: int
    ok: int
    errors: dict[str, int]
    invalid: tuple[InvalidLine, ...]
    missing: tuple[str, ...]
    elapsed_s: float
    state: Path
    errors_file: Path

    @property
    def answered(self) -> int:
        return self.ok + sum(self.errors.values())

    @property
    def rate_per_s(self) -> float:
        """Final replies received per second of the run."""
        return self.answered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def complete(self) -> bool:
        return not self.invalid and not self.missing


@dataclass
class _Run:
    total: int
    done: set[str]
    state_log: AppendLog
    errors_log: AppendLog
    slots: asyncio.Semaphore
    reply_timeout_s: float | None
    on_progress: Callable[[BackfillProgress], None] | None
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    sent: int = 0
    skipped: int = 0
    duplicates: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    invalid: list[InvalidLine] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def report(self, event: ProgressEvent, line: int, task_id: str | None) -> None:
        if self.on_progress is None:
            return
        self.on_progress(
            BackfillProgress(
                event=event,
                line=line,
                task_id=task_id,
                total=self.total,
                sent=self.sent,
                skipped=self.skipped,
                duplicates=self.duplicates,
                ok=self.ok,
                errors=sum(self.errors.values()),
                invalid=len(self.invalid),
                missing=len(self.missing),
            )
        )

    def log_error(self, record: dict[str, Any]) -> None:
        self.errors_log.append(json.dumps({"run": self.started, **record}))

    def reject(self, line: int, reason: str, text: str) -> None:
        self.invalid.append(InvalidLine(line, reason))
        self.log_error(
            {
                "line": line,
                "id": None,
                "kind": "invalid_line",
                "reason": reason,
                "text": text.rstrip("\r\n")[:MAX_TEXT_CHARS],
            }
        )
        self.report("invalid", line, None)

    def record(self, line: int, reply: Reply, task_id: str) -> None:
        # The state file first: once a reply is here, a rerun must not need to send it again.
        self.state_log.append(state_line(task_id, reply.status))
        if reply.status == "ok":
            self.ok += 1
        else:
            code = reply.error.code if reply.error is not None else reply.status
            self.errors[code] += 1
            message = reply.error.message if reply.error is not None else ""
            self.log_error(
                {
                    "line": line,
                    "id": task_id,
                    "kind": "reply",
                    "status": reply.status,
                    "code": code,
                    "reason": message,
                }
            )
        self.report("answered", line, task_id)

    def lose(self, line: int, task_id: str, reason: str) -> None:
        self.missing.append(task_id)
        self.log_error({"line": line, "id": task_id, "kind": "no_reply", "reason": reason})
        self.report("missing", line, task_id)

    async def settle(self, line: int, task_id: str, future: "asyncio.Future[Reply]") -> None:
        """Wait for one task's reply and record it; frees its window slot either way."""
        try:
            try:
                reply = await asyncio.wait_for(future, self.reply_timeout_s)
            except asyncio.TimeoutError:
                self.lose(line, task_id, f"no reply within {self.reply_timeout_s:g} s")
                return
            except Exception as exc:  # a reply the client could not read
                self.lose(line, task_id, f"unreadable reply: {exc}")
                return
            self.record(line, reply, task_id)
        finally:
            self.slots.release()


async def backfill(
    client: SwarmClient,
    source: Path,
    *,
    state: Path | None = None,
    rate_per_s: float | None = None,
    window: int = 64,
    on_progress: Callable[[BackfillProgress], None] | None = None,
    reply_timeout_s: float | None = None,
    errors: Path | None = None,
    retry_errors: bool = False,
) -> BackfillSummary:
    """Send every task of `source` not yet recorded in `state`, at most `rate_per_s` per second
    and `window` unanswered at a time, and wait for their replies.

    `state` defaults to `<source>.done`, `errors` to `<source>.errors.jsonl`; both are appended
    to. `reply_timeout_s` bounds the wait for each reply (None: wait as long as it takes); a
    task past it is counted `missing`, not recorded, and sent again by the next run.
    `retry_errors` sends again the ids whose recorded reply was `error`, as replays (see the
    module's docstring). `on_progress` is called after every step. Cancelling the call stops
    sending and stops waiting; what was recorded stays recorded, and a rerun resumes from
    there. A `SubmitError` (RabbitMQ refused or stayed unreachable) ends the run the same way
    and is raised.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, not {window}")
    state = state or default_state_path(source)
    errors = errors or default_errors_path(source)
    bucket = TokenBucket(rate_per_s) if rate_per_s is not None else None
    started_s = time.monotonic()
    seen: set[str] = set()
    waiting: set[asyncio.Task[None]] = set()
    state_log, errors_log = AppendLog(state), AppendLog(errors)
    with contextlib.closing(state_log), contextlib.closing(errors_log):
        run = _Run(
            total=count_lines(source),
            done=load_done(state, retry_errors=retry_errors),
            state_log=state_log,
            errors_log=errors_log,
            slots=asyncio.Semaphore(window),
            reply_timeout_s=reply_timeout_s,
            on_progress=on_progress,
        )
        try:
            with contextlib.closing(task_lines(source)) as lines:
                for number, text in lines:
                    task = parse_line(text)
                    if isinstance(task, str):
                        run.reject(number, task, text)
                    elif task.id in run.done:
                        run.skipped += 1
                        run.report("skipped", number, task.id)
                    elif task.id in seen:
                        run.duplicates += 1
                        run.report("duplicate", number, task.id)
                    else:
                        seen.add(task.id)
                        future = await _send(client, task, run.slots, bucket, retry_errors)
                        run.sent += 1
                        run.report("sent", number, task.id)
                        waiter = asyncio.create_task(run.settle(number, task.id, future))
                        waiting.add(waiter)
                        waiter.add_done_callback(waiting.discard)
            if waiting:
                await asyncio.gather(*waiting)
        finally:
            for waiter in waiting:
                waiter.cancel()
    return BackfillSummary(
        lines=run.total,
        sent=run.sent,
        skipped=run.skipped,
        duplicates=run.duplicates,
        ok=run.ok,
        errors=dict(run.errors),
        invalid=tuple(run.invalid),
        missing=tuple(run.missing),
        elapsed_s=time.monotonic() - started_s,
        state=state,
        errors_file=errors,
    )


async def _send(
    client: SwarmClient,
    task: TaskMessage,
    slots: asyncio.Semaphore,
    bucket: TokenBucket | None,
    replay: bool = False,
) -> "asyncio.Future[Reply]":
    """Publish one task once the window has room and the bucket has a token."""
    await slots.acquire()
    try:
        if bucket is not None:
            await bucket.acquire()
        optional = task.model_dump(exclude_none=True, exclude=REQUIRED_KEYS)
        future = await client.send(
            task.type, task.handler, task.args, task_id=task.id, replay=replay, **optional
        )
        _raise_if_cancelling()
        return future
    except BaseException:
        slots.release()
        raise


def _raise_if_cancelling() -> None:
    """Honour a cancellation that Python 3.11's `asyncio.wait_for` swallowed: it returns the
    result instead when its inner await completes as the cancel arrives (CPython gh-86296,
    fixed in 3.12), and the client's publish awaits through it. The task still counts the
    request (`Task.cancelling`), so a cancelled run stops here rather than running to its end."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    if cancelling is not None and cancelling() > 0:
        raise asyncio.CancelledError
