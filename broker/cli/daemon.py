"""`swarm run` starts the daemon; `config`, `schema` and `asyncapi` print what it runs by:
the effective settings and the wire contract."""

import json
import os
import sys
from typing import Annotated

import typer

from broker.cli.common import fail, run_async, settings_or_exit
from schemas.errors import SwarmError


def run() -> None:
    """Start the broker daemon (AMQP_URL, RAY_ADDRESS and SWARM_* configure it)."""
    from broker.daemon import Daemon
    from broker.logging import configure_logging

    settings = settings_or_exit()
    configure_logging(settings.log_format, settings.log_level)
    try:
        run_async(Daemon(settings).serve())
    except SwarmError as exc:
        fail(exc)
    # Everything is drained, closed and disconnected by now. Skip the interpreter's own
    # teardown: Ray's native threads can abort it (SIGABRT) while modules are torn down,
    # which would turn a clean stop into exit status -6.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def config(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print the effective configuration (environment over TOML file over defaults), with
    secrets masked."""
    values = settings_or_exit().effective()
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


def schema() -> None:
    """Print the JSON Schema of the wire contract (task, reply, control)."""
    from schemas.jsonschema import wire_schema

    json.dump(wire_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")


def asyncapi() -> None:
    """Print the AsyncAPI 3.0.0 document of the wire contract (as in docs/asyncapi.json)."""
    from schemas.asyncapi import render

    sys.stdout.write(render())
