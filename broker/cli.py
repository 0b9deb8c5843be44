"""The `swarm` command: run the daemon, submit or cancel a task, backfill a file of tasks, show
status, look at and replay dead letters (broker/dead_cli.py), print the wire schema."""

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import SecretStr

from broker.settings import CONFIG_ENV, Settings, load_settings
from schemas.errors import SwarmError

if TYPE_CHECKING:
    from broker.producer.backfill import BackfillSummary
    from broker.producer.client import SwarmClient

app = typer.Typer(
    help="Swarm: a resource-aware task broker between RabbitMQ and Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(exc: BaseException) -> None:
    typer.echo(f"swarm: {exc}", err=True)
    raise typer.Exit(code=1)


@app.callback()
def _options(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help=f"a TOML file of settings (or {CONFIG_ENV}); the environment wins over it",
            show_default=False,
        ),
    ] = None,
) -> None:
    if config is not None:
        os.environ[CONFIG_ENV] = str(config)


def _settings() -> Settings:
    """The settings, or one clear line and exit 2 when they are not valid."""
    try:
        return load_settings()
    except (ValueError, OSError) as exc:  # SettingsInvalid is a ValueError
        typer.echo(f"swarm: invalid configuration: {exc}", err=True)
        raise typer.Exit(code=2) from None


def _client(settings: Settings, *, one_shot: bool = False) -> "SwarmClient":
    """A producers' client on the nodes of AMQP_URL (in the order SWARM_AMQP_SHUFFLE says).
    `one_shot`: a command that exits once answered; its reply queue is deleted on the way
    out, even when a reply did not come in time (no one would ever read it)."""
    from broker.producer.client import SwarmClient

    return SwarmClient(
        settings.amqp_url.get_secret_value(),
        shuffle=settings.amqp_shuffle,
        delete_reply_queue=True if one_shot else None,
    )


def _run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


@app.command()
def run() -> None:
    """Start the broker daemon (AMQP_URL, RAY_ADDRESS and SWARM_* configure it)."""
    from broker.daemon import Daemon
    from broker.logging import configure_logging

    settings = _settings()
    configure_logging(settings.log_format, settings.log_level)
    try:
        _run_async(Daemon(settings).serve())
    except SwarmError as exc:
        _fail(exc)
    # Everything is drained, closed and disconnected by now. Skip the interpreter's own
    # teardown: Ray's native threads can abort it (SIGABRT) while modules are torn down,
    # which would turn a clean stop into exit status -6.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


SUBMIT_EXIT_CODES = (
    "Exit status: 0 the reply is ok; 1 RabbitMQ could not be reached, did not take the task, "
    "or no reply came within --wait; 2 invalid input (nothing was sent); 3 the reply is not "
    "ok (error, expired or cancelled: printed as JSON all the same)."
)


@app.command(epilog=SUBMIT_EXIT_CODES)
def submit(
    task_type: Annotated[
        str, typer.Argument(metavar="TYPE", help="training, inference or data_processing")
    ],
    handler: Annotated[str, typer.Argument(help="a handler registered on the daemon")],
    args: Annotated[str, typer.Option("--args", help="the handler's input as JSON")] = "null",
    task_id: Annotated[
        str | None,
        typer.Option(
            "--id",
            help="the task id (default: a new uuid); the daemon runs an id once and answers "
            "it again from its outcome store",
            show_default=False,
        ),
    ] = None,
    priority: Annotated[
        int | None, typer.Option(help="0..9, higher runs first", show_default=False)
    ] = None,
    pool: Annotated[
        str | None, typer.Option(help="pin to gpu, cpu or memory", show_default=False)
    ] = None,
    resources: Annotated[
        str | None,
        typer.Option(
            help="what one run needs: cpus=2,gpus=1,memory_mb=4096 or the same as JSON "
            "(default: the type's)",
            show_default=False,
        ),
    ] = None,
    deadline: Annotated[
        str | None,
        typer.Option(
            help="expire the task if it has not started by then: ISO 8601 "
            "(2030-01-31T12:00:00+00:00; local time without an offset) or Unix seconds",
            show_default=False,
        ),
    ] = None,
    deadline_in_s: Annotated[
        float | None,
        typer.Option("--deadline-in", help="the deadline as seconds from now", show_default=False),
    ] = None,
    run_timeout_s: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            help="the task's run limit in seconds: the daemon stops the run past it and "
            "answers timeout (not the wait for the reply: --wait)",
            show_default=False,
        ),
    ] = None,
    retries: Annotated[
        int | None,
        typer.Option(
            "--retries",
            help="runs again after a retryable failure, 0..20 (default: the daemon's)",
            show_default=False,
        ),
    ] = None,
    progress: Annotated[
        bool,
        typer.Option(
            "--progress", help="print each progress message as a JSON line on stderr as it comes"
        ),
    ] = False,
    wait_s: Annotated[
        float,
        typer.Option(
            "--wait",
            help="seconds this command waits for the reply (the task goes on past it)",
        ),
    ] = 60.0,
) -> None:
    """Submit one task and print its reply as JSON.

    The task is checked against the wire schema before anything is sent.
    """
    import time

    from broker.submit_options import (
        OptionError,
        build_task,
        parse_args,
        parse_deadline,
        parse_resources,
    )

    try:
        if not wait_s > 0 or wait_s == float("inf"):
            raise OptionError(f"--wait must be a number of seconds > 0, not {wait_s}")
        task = build_task(
            task_type,
            handler,
            parse_args(args),
            task_id=task_id,
            resources=parse_resources(resources),
            pool=pool,
            priority=priority,
            deadline=parse_deadline(deadline, deadline_in_s, now=time.time()),
            timeout_s=run_timeout_s,
            max_retries=retries,
        )
    except OptionError as exc:
        for line in str(exc).splitlines():
            typer.echo(f"swarm: {line}", err=True)
        raise typer.Exit(code=2) from None

    settings = _settings()
    optional = task.model_dump(
        exclude_none=True, exclude={"v", "id", "type", "handler", "args", "timeout_s"}
    )

    def show_progress(message: Any) -> None:
        typer.echo(json.dumps(message.model_dump(mode="json"), default=str), err=True)

    async def go() -> dict[str, Any]:
        async with _client(settings, one_shot=True) as client:
            reply = await client.submit(
                task.type,
                task.handler,
                task.args,
                task_id=task.id,
                wait_s=wait_s,
                run_timeout_s=task.timeout_s,
                on_progress=show_progress if progress else None,
                **optional,
            )
            return reply.model_dump(mode="json")

    from broker.producer.client import ReplyTimeout

    try:
        result = _run_async(go())
    except ReplyTimeout as exc:
        typer.echo(f"swarm: {exc}", err=True)
        typer.echo(
            f"swarm: task {task.id} may still run; `swarm cancel {task.id}` cancels it", err=True
        )
        raise typer.Exit(code=1) from None
    except SwarmError as exc:
        _fail(exc)
    typer.echo(json.dumps(result, indent=2, default=str))
    if result["status"] != "ok":
        raise typer.Exit(code=3)


CANCEL_EXIT_CODES = (
    "Exit status: 0 the daemon will answer the task cancelled (it was waiting or running, or "
    "has not arrived yet and is remembered); 1 RabbitMQ could not be reached or no answer came "
    "within --wait; 2 invalid input; 3 too late: the task has finished or is finishing."
)


@app.command(epilog=CANCEL_EXIT_CODES)
def cancel(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="the id of the task to cancel")],
    wait_s: Annotated[
        float, typer.Option("--wait", help="seconds to wait for the daemon's answer")
    ] = 30.0,
) -> None:
    """Cancel a task by id and print the daemon's answer as JSON: its `state` is waiting,
    running, unseen (remembered, and answered cancelled when it comes), finishing or finished
    (with the stored `status`)."""
    from pydantic import ValidationError

    from schemas.control import CancelRequest

    try:
        CancelRequest.model_validate({"v": 1, "op": "cancel", "id": task_id})
    except ValidationError as exc:
        reason = exc.errors()[0].get("msg", "invalid")
        typer.echo(f"swarm: ID: {reason} (got {json.dumps(task_id)})", err=True)
        raise typer.Exit(code=2) from None
    if not wait_s > 0 or wait_s == float("inf"):
        typer.echo(f"swarm: --wait must be a number of seconds > 0, not {wait_s}", err=True)
        raise typer.Exit(code=2)
    settings = _settings()

    async def go() -> dict[str, Any]:
        async with _client(settings, one_shot=True) as client:
            return await client.cancel(task_id, wait_s=wait_s)

    try:
        answer = _run_async(go())
    except SwarmError as exc:
        _fail(exc)
    typer.echo(json.dumps(answer, indent=2, default=str))
    if answer.get("state") in ("finished", "finishing"):
        raise typer.Exit(code=3)


@app.command()
def backfill(
    source: Annotated[Path, typer.Argument(metavar="FILE", help="JSONL file, one task per line")],
    rate: Annotated[
        float | None, typer.Option("--rate", help="send at most N tasks per second")
    ] = None,
    window: Annotated[int, typer.Option(help="at most N tasks unanswered at a time")] = 64,
    state: Annotated[
        Path | None,
        typer.Option(help="ids already done, appended to (default: FILE.done)", show_default=False),
    ] = None,
    amqp_url: Annotated[
        str | None,
        typer.Option(
            "--amqp-url",
            help="RabbitMQ URL, or the comma-separated URLs of a cluster's nodes "
            "(default: AMQP_URL)",
            show_default=False,
        ),
    ] = None,
    wait_s: Annotated[
        float | None,
        typer.Option("--wait", help="seconds to wait for each reply (default: no limit)"),
    ] = None,
    retry_errors: Annotated[
        bool,
        typer.Option(
            "--retry-errors",
            help="send again the lines whose reply was an error (they run again; an ok "
            "line never does)",
        ),
    ] = False,
) -> None:
    """Send every task of a JSONL file, resumably: a rerun skips the ids already done.

    Exit status 0 when every line has a final outcome (error replies included), 1 when lines
    were invalid or replies did not come, 2 when RabbitMQ could not be reached.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from broker.errors import AmqpUnavailable
    from broker.producer.backfill import BackfillProgress
    from broker.producer.backfill import backfill as run_backfill
    from broker.producer.client import SubmitError

    if not source.is_file():
        _fail(FileNotFoundError(f"no such file: {source}"))
    if rate is not None and rate <= 0:
        _fail(ValueError(f"--rate must be > 0, not {rate:g}"))
    if window < 1:
        _fail(ValueError(f"--window must be >= 1, not {window}"))
    settings = _settings()
    if amqp_url:
        settings = settings.model_copy(update={"amqp_url": SecretStr(amqp_url)})
    bar = Progress(
        TextColumn("backfill"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    line_bar = bar.add_task("backfill", total=None, counts="")

    def on_progress(step: BackfillProgress) -> None:
        counts = f"ok {step.ok}  error {step.errors}  skipped {step.skipped}"
        if step.invalid:
            counts += f"  invalid {step.invalid}"
        bar.update(line_bar, total=step.total, completed=step.finished, counts=counts)

    async def go() -> "BackfillSummary":
        async with _client(settings) as client:
            return await run_backfill(
                client,
                source,
                state=state,
                rate_per_s=rate,
                window=window,
                on_progress=on_progress,
                reply_timeout_s=wait_s,
                retry_errors=retry_errors,
            )

    try:
        with bar:
            summary = _run_async(go())
    except (AmqpUnavailable, SubmitError) as exc:
        typer.echo(f"swarm: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except (SwarmError, OSError) as exc:
        _fail(exc)
    except KeyboardInterrupt:
        typer.echo("swarm: interrupted; run the same command again to resume", err=True)
        raise typer.Exit(code=130) from None
    _print_backfill(summary)
    if not summary.complete:
        raise typer.Exit(code=1)


def _print_backfill(summary: "BackfillSummary") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="backfill", show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("lines", str(summary.lines))
    table.add_row("sent", str(summary.sent))
    table.add_row("skipped (already done)", str(summary.skipped))
    if summary.duplicates:
        table.add_row("duplicates (same id)", str(summary.duplicates))
    table.add_row("ok", str(summary.ok))
    for code, count in sorted(summary.errors.items()):
        table.add_row(f"error {code}", str(count))
    table.add_row("invalid lines", str(len(summary.invalid)))
    table.add_row("no reply", str(len(summary.missing)))
    table.add_row("elapsed", f"{summary.elapsed_s:.1f} s")
    table.add_row("rate", f"{summary.rate_per_s:.1f} replies/s")
    console = Console()
    console.print(table)
    shown = 20
    for invalid in summary.invalid[:shown]:
        console.print(f"line {invalid.line}: {invalid.reason}", markup=False, highlight=False)
    if len(summary.invalid) > shown:
        console.print(f"... and {len(summary.invalid) - shown} more", highlight=False)
    if summary.invalid or summary.errors or summary.missing:
        console.print(f"details: {summary.errors_file}", markup=False, highlight=False)


STATUS_EXIT_CODES = (
    "Exit status: 0 answered (with --watch: stopped by --count or Ctrl-C); 1 RabbitMQ could "
    "not be reached or no answer came in time; 2 invalid configuration."
)


@app.command(epilog=STATUS_EXIT_CODES)
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="refresh until Ctrl-C")] = False,
    interval_s: Annotated[
        float, typer.Option("--interval", min=0.1, help="seconds between refreshes")
    ] = 2.0,
    count: Annotated[
        int | None, typer.Option(help="with --watch: stop after N refreshes", show_default=False)
    ] = None,
) -> None:
    """Ask the daemon for pools, nodes, queues, limits and the RabbitMQ node it uses."""
    settings = _settings()
    if not watch:

        async def once() -> dict[str, Any]:
            async with _client(settings, one_shot=True) as client:
                return await client.status(wait_s=15.0)

        try:
            answer = _run_async(once())
        except SwarmError as exc:
            _fail(exc)
        if as_json:
            typer.echo(json.dumps(answer, indent=2))
            return
        from broker.ops.status_view import render_status

        render_status(answer)
        return
    try:
        _run_async(_watch_status(settings, interval_s, count, as_json))
    except SwarmError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(code=0) from None


async def _watch_status(
    settings: Settings, interval_s: float, count: int | None, as_json: bool
) -> None:
    """One connection, a status request every `interval_s`, the tables redrawn in place."""
    import time

    from rich.live import Live

    from broker.ops.status_view import status_view

    async with _client(settings, one_shot=True) as client:
        refreshes = 0
        with Live(auto_refresh=False, transient=False) as live:
            while count is None or refreshes < count:
                answer = await client.status(wait_s=15.0)
                refreshes += 1
                stamp = time.strftime("%H:%M:%S")
                if as_json:
                    live.console.print_json(json.dumps(answer))
                else:
                    caption = f"{stamp}  refresh {refreshes} every {interval_s:g} s, Ctrl-C stops"
                    live.update(status_view(answer, caption), refresh=True)
                if count is None or refreshes < count:
                    await asyncio.sleep(interval_s)


@app.command()
def config(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print the effective configuration (environment over TOML file over defaults), with
    secrets masked."""
    values = _settings().effective()
    if as_json:
        typer.echo(json.dumps(values, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="swarm configuration")
    table.add_column("setting")
    table.add_column("environment variable")
    table.add_column("value")
    for name, value in sorted(values.items()):
        variable = {"amqp_url": "AMQP_URL", "ray_address": "RAY_ADDRESS"}.get(
            name, f"SWARM_{name.upper()}"
        )
        table.add_row(name, variable, json.dumps(value) if not isinstance(value, str) else value)
    Console().print(table)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the wire contract (task, reply, control)."""
    from schemas.jsonschema import wire_schema

    json.dump(wire_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")


@app.command()
def asyncapi() -> None:
    """Print the AsyncAPI 3.0.0 document of the wire contract (as in docs/asyncapi.json)."""
    from schemas.asyncapi import render

    sys.stdout.write(render())


def _add_subcommands() -> None:
    # Registered last: broker.dead_cli reuses this module's helpers when its commands run.
    from broker.dead_cli import dead_app

    app.add_typer(dead_app, name="dead")
    from broker.console.cli import console

    app.command("console")(console)


_add_subcommands()


def main() -> None:  # pragma: no cover
    app()
