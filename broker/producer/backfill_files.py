"""The files of a backfill: its JSONL input read as tasks, and the state and errors files it
appends to (broker/producer/backfill.py runs it)."""

import hashlib
import json
from collections.abc import Generator
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from schemas.task import TaskMessage
from schemas.topology import PROTOCOL_VERSION

ID_PREFIX = "bf-"
ID_HEX_CHARS = 32  # 128 bits of sha256: collisions are not a concern for any file size


def default_state_path(source: Path) -> Path:
    return source.with_name(source.name + ".done")


def default_errors_path(source: Path) -> Path:
    return source.with_name(source.name + ".errors.jsonl")


def derive_id(fields: dict[str, Any]) -> str:
    """The id of a line without one: stable across runs, whatever the line's spacing or key
    order."""
    content = {key: value for key, value in fields.items() if key != "id"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return ID_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()[:ID_HEX_CHARS]


def parse_line(text: str) -> TaskMessage | str:
    """The task of one line, or the reason it is not one."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not JSON: {exc.msg} (column {exc.colno})"
    if not isinstance(fields, dict):
        return f"not a JSON object but {type(fields).__name__}"
    task_id = fields.get("id")
    if task_id is None:
        task_id = derive_id(fields)
    try:
        return TaskMessage.model_validate({"v": PROTOCOL_VERSION, **fields, "id": task_id})
    except ValidationError as exc:
        return "; ".join(_describe(error) for error in exc.errors())


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "task"
    if error["type"] == "extra_forbidden":
        return f"unknown key {where!r}"
    return f"{where}: {error['msg']}"


def count_lines(source: Path) -> int:
    """Lines that hold something; blank lines are not tasks and are not counted."""
    return sum(1 for _ in task_lines(source))


def task_lines(source: Path) -> Generator[tuple[int, str], None, None]:
    # Plain buffered reads: each is a memory copy, short enough not to stall the event loop.
    with source.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if text.strip():
                yield number, text


def state_line(task_id: str, status: str) -> str:
    """A state file's line: the id and the reply's status, tab-separated (a task id holds no
    control character: the schema refuses them)."""
    return f"{task_id}\t{status}"


def load_done(state: Path, *, retry_errors: bool = False) -> set[str]:
    """The ids a previous run recorded: not to send again. With `retry_errors`, less those
    whose last recorded reply was `error` (a line of an older run, an id alone, counts as
    done). A torn last line (a crash mid-write) holds a partial id that matches nothing, so
    that task is sent again: harmless, its id is the same."""
    if not state.exists():
        return set()
    last: dict[str, str | None] = {}
    with state.open(encoding="utf-8") as lines:
        for text in lines:
            task_id, _, status = text.strip().partition("\t")
            if task_id:
                last[task_id] = status or None
    return {task_id for task_id, status in last.items() if not (retry_errors and status == "error")}


class AppendLog:
    """A file appended to one line at a time, flushed at once, and opened on first use (a run
    without errors leaves no empty errors file behind)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def append(self, line: str) -> None:
        if self._handle is None:
            self._handle = self._open()
        self._handle.write(line + "\n")
        self._handle.flush()

    def _open(self) -> IO[str]:
        handle = self.path.open("a", encoding="utf-8")
        if handle.tell() > 0:
            # End a torn last line (a crash mid-write) so the next record starts clean.
            with self.path.open("rb") as raw:
                raw.seek(-1, 2)
                if raw.read(1) != b"\n":
                    handle.write("\n")
        return handle

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
