"""`swarm backfill`: every task of a JSONL file, sent resumably, with a progress bar and a
summary table."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import SecretStr

from broker.cli.common import client_for, fail, run_async, settings_or_exit
from schemas.errors import SwarmError

if TYPE_CHECKING:
    from broker.producer.backfill import BackfillSummary


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
        fail(FileNotFoundError(f"no such file: {source}"))
    if rate is not None and rate <= 0:
        fail(ValueError(f"--rate must be > 0, not {rate:g}"))
    if window < 1:
        fail(ValueError(f"--window must be >= 1, not {window}"))
    settings = settings_or_exit()
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
        async with client_for(settings) as client:
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
            summary = run_async(go())
    except (AmqpUnavailable, SubmitError) as exc:
        typer.echo(f"swarm: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except (SwarmError, OSError) as exc:
        fail(exc)
    except KeyboardInterrupt:
        typer.echo("swarm: interrupted; run the same command again to resume", err=True)
        raise typer.Exit(code=130) from None
    print_summary(summary)
    if not summary.complete:
        raise typer.Exit(code=1)


def print_summary(summary: "BackfillSummary") -> None:
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
