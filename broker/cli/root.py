"""The `swarm` command: run the daemon, submit or cancel a task, backfill a file of tasks, show
status, look at and replay dead letters, serve the console, print the wire contract. Each
command lives in its own module of this package; this one names them, in the order `--help`
lists them."""

import os
from pathlib import Path
from typing import Annotated

import typer

from broker.cli.backfill import backfill
from broker.cli.daemon import asyncapi, config, run, schema
from broker.cli.dead import dead_app
from broker.cli.status import STATUS_EXIT_CODES, status
from broker.cli.submit import CANCEL_EXIT_CODES, SUBMIT_EXIT_CODES, cancel, submit
from broker.console.cli import console
from broker.settings import CONFIG_ENV

app = typer.Typer(
    help="Swarm: a resource-aware task broker between RabbitMQ and Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


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


app.command()(run)
app.command(epilog=SUBMIT_EXIT_CODES)(submit)
app.command(epilog=CANCEL_EXIT_CODES)(cancel)
app.command()(backfill)
app.command(epilog=STATUS_EXIT_CODES)(status)
app.command()(config)
app.command()(schema)
app.command()(asyncapi)
app.add_typer(dead_app, name="dead")
app.command()(console)
