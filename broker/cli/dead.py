"""`swarm dead`: look at the dead letters, replay them after a fix, purge them.

Reading never removes a letter (broker/amqp/dead_letter_box.py says how). `replay` sends each
chosen letter back to its original queue with its original body and properties and removes
it from `swarm.dead` only once RabbitMQ confirmed the republish; the task then runs again
although the outcome store holds its error (a task whose stored outcome is `ok` is answered
from the store and never re-run). `purge` removes letters for good, after asking.

Exit status: 0 done; 1 RabbitMQ could not be reached, a letter could not be replayed, or
`show` found no such letter; 2 a purge not confirmed.
"""

import asyncio
import json
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from broker.cli.common import fail, run_async, settings_or_exit
from broker.ops.dead_letter_filter import LetterFilter, groups
from broker.ops.dead_letter_view import details, summary
from schemas.errors import SwarmError

if TYPE_CHECKING:
    from broker.amqp.dead_letter_box import DeadLetter

dead_app = typer.Typer(
    help="The dead letters (swarm.dead): list, show, replay after a fix, purge. Exit status: "
    "0 done, 1 RabbitMQ unreachable / a replay failed / no such letter, 2 purge not confirmed.",
    no_args_is_help=True,
)

Codes = Annotated[list[str] | None, typer.Option("--code", help="error code (repeatable)")]
Handlers = Annotated[list[str] | None, typer.Option("--handler", help="handler (repeatable)")]
Queues = Annotated[
    list[str] | None, typer.Option("--queue", help="source queue or task type (repeatable)")
]
Ids = Annotated[list[str] | None, typer.Option("--id", help="task id (repeatable)")]
OlderThan = Annotated[
    float | None, typer.Option("--older-than", help="dead-lettered more than S seconds ago")
]
NewerThan = Annotated[
    float | None, typer.Option("--newer-than", help="dead-lettered less than S seconds ago")
]
Limit = Annotated[int, typer.Option("--limit", min=1, help="read at most N letters")]
DEFAULT_LIMIT = 10_000


def _letter_filter(
    codes: list[str] | None,
    handlers: list[str] | None,
    queues: list[str] | None,
    ids: list[str] | None,
    older_than_s: float | None,
    newer_than_s: float | None,
) -> LetterFilter:
    return LetterFilter(
        codes=tuple(codes or ()),
        handlers=tuple(handlers or ()),
        queues=tuple(queues or ()),
        ids=tuple(ids or ()),
        older_than_s=older_than_s,
        newer_than_s=newer_than_s,
    )


def _amqp_url() -> str:
    return settings_or_exit().amqp_url.get_secret_value()


def _run(coro: Any) -> Any:
    try:
        return run_async(coro)
    except SwarmError as exc:
        fail(exc)


@dead_app.command("ls")
def list_letters(
    code: Codes = None,
    handler: Handlers = None,
    queue: Queues = None,
    task_id: Ids = None,
    older_than: OlderThan = None,
    newer_than: NewerThan = None,
    limit: Limit = DEFAULT_LIMIT,
    each: Annotated[bool, typer.Option("--each", help="one line per letter")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Count the dead letters by error code, handler and queue (or list each). Removes none."""
    from broker.amqp.dead_letter_box import DeadLetterBox

    chosen = _letter_filter(code, handler, queue, task_id, older_than, newer_than)

    async def go() -> list["DeadLetter"]:
        async with DeadLetterBox.open(_amqp_url()) as box:
            return [letter for letter in await box.scan(limit) if chosen(letter)]

    letters = _run(go())
    now = time.time()
    if as_json:
        if each:
            typer.echo(json.dumps([summary(letter, now) for letter in letters], indent=2))
        else:
            rows = [
                {"code": c, "handler": h, "queue": q, "count": n}
                for (c, h, q), n in groups(letters)
            ]
            typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"swarm.dead: {len(letters)} letter(s)", title_justify="left")
    if each:
        for column in ("id", "code", "handler", "queue", "age s", "error"):
            table.add_column(column)
        for letter in letters:
            row = summary(letter, now)
            table.add_row(
                *(
                    str(row[key] if row[key] is not None else "-")
                    for key in row
                    if key != "attempts"
                )
            )
    else:
        for column in ("code", "handler", "queue", "count"):
            table.add_column(column, justify="right" if column == "count" else "left")
        for (c, h, q), n in groups(letters):
            table.add_row(c, h, q, str(n))
    Console().print(table)


@dead_app.command("show")
def show(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="the task id")],
    limit: Limit = DEFAULT_LIMIT,
) -> None:
    """One letter: its decoded body, headers, error and traceback. Removes nothing."""
    from broker.amqp.dead_letter_box import DeadLetterBox

    async def go() -> dict[str, Any] | None:
        async with DeadLetterBox.open(_amqp_url()) as box:
            for letter in await box.scan(limit):
                if letter.task_id == task_id:
                    return details(letter)
        return None

    found = _run(go())
    if found is None:
        fail(LookupError(f"no dead letter of task {task_id!r} in swarm.dead"))
    typer.echo(json.dumps(found, indent=2, default=_printable))


def _printable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


@dead_app.command("replay")
def replay(
    code: Codes = None,
    handler: Handlers = None,
    queue: Queues = None,
    task_id: Ids = None,
    older_than: OlderThan = None,
    newer_than: NewerThan = None,
    limit: Limit = DEFAULT_LIMIT,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be replayed")] = False,
    rate: Annotated[
        float | None, typer.Option("--rate", min=0.001, help="replay at most N letters a second")
    ] = None,
) -> None:
    """Send the chosen letters back to their queues to run again (after the fix)."""
    from broker.amqp.dead_letter_box import DeadLetterBox, ReplayError

    chosen = _letter_filter(code, handler, queue, task_id, older_than, newer_than)

    async def go() -> tuple[int, list[str]]:
        failures: list[str] = []
        replayed = 0
        async with DeadLetterBox.open(_amqp_url()) as box:
            letters = [letter for letter in await box.scan(limit) if chosen(letter)]
            if dry_run:
                for letter in letters:
                    typer.echo(f"would replay {letter.task_id} ({letter.code}) to {letter.queue}")
                return len(letters), failures
            for index, letter in enumerate(letters):
                if rate is not None and index:
                    await asyncio.sleep(1.0 / rate)
                try:
                    await box.replay(letter)
                    replayed += 1
                except ReplayError as exc:
                    failures.append(str(exc))
        return replayed, failures

    done, failures = _run(go())
    verb = "would replay" if dry_run else "replayed"
    typer.echo(f"{verb} {done} dead letter(s)")
    for failure in failures:
        typer.echo(f"swarm: {failure}", err=True)
    if failures:
        raise typer.Exit(code=1)


@dead_app.command("purge")
def purge(
    code: Codes = None,
    handler: Handlers = None,
    queue: Queues = None,
    task_id: Ids = None,
    older_than: OlderThan = None,
    newer_than: NewerThan = None,
    limit: Limit = DEFAULT_LIMIT,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
) -> None:
    """Remove the chosen letters for good (asks first unless --yes)."""
    from broker.amqp.dead_letter_box import DeadLetterBox

    chosen = _letter_filter(code, handler, queue, task_id, older_than, newer_than)

    async def go() -> int | None:
        async with DeadLetterBox.open(_amqp_url()) as box:
            letters = [letter for letter in await box.scan(limit) if chosen(letter)]
            if not letters:
                return 0
            if not yes:
                question = f"remove {len(letters)} dead letter(s) from swarm.dead for good?"
                if not sys.stdin.isatty():
                    typer.echo(f"swarm: {question} Not asked (no terminal): add --yes", err=True)
                    return None
                # In a thread: the letters stay held (unacknowledged) while the operator reads.
                if not await asyncio.to_thread(typer.confirm, question):
                    return None
            for letter in letters:
                await box.remove(letter)
            return len(letters)

    removed = _run(go())
    if removed is None:
        typer.echo("nothing removed")
        raise typer.Exit(code=2)
    typer.echo(f"removed {removed} dead letter(s)")
