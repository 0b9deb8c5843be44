"""The `swarm` command: run the daemon, submit a task, show status, print the wire schema."""

import asyncio
import json
import os
import sys
from typing import Annotated, Any

import typer

from broker.settings import Settings
from schemas.errors import SwarmError

app = typer.Typer(
    help="Swarm: a resource-aware task broker between RabbitMQ and Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(exc: BaseException) -> None:
    typer.echo(f"swarm: {exc}", err=True)
    raise typer.Exit(code=1)


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

    settings = Settings()
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


@app.command()
def submit(
    task_type: Annotated[str, typer.Argument(help="training, inference or data_processing")],
    handler: Annotated[str, typer.Argument(help="a handler registered on the daemon")],
    args: Annotated[str, typer.Option("--args", help="the handler's input as JSON")] = "null",
    priority: Annotated[int | None, typer.Option(help="0..9, higher runs first")] = None,
    pool: Annotated[str | None, typer.Option(help="pin to gpu, cpu or memory")] = None,
    wait_s: Annotated[float, typer.Option("--wait", help="seconds to wait for the reply")] = 60.0,
) -> None:
    """Submit one task and print its reply as JSON."""
    from broker.client import SwarmClient

    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as exc:
        _fail(ValueError(f"--args is not JSON: {exc}"))

    async def go() -> dict[str, Any]:
        async with SwarmClient(Settings().amqp_url.get_secret_value()) as client:
            reply = await client.submit(
                task_type, handler, parsed, timeout_s=wait_s, priority=priority, pool=pool
            )
            return reply.model_dump(mode="json")

    try:
        result = _run_async(go())
    except SwarmError as exc:
        _fail(exc)
    typer.echo(json.dumps(result, indent=2, default=str))
    if result["status"] != "ok":
        raise typer.Exit(code=2)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON")] = False,
) -> None:
    """Ask the daemon for pools, nodes, queues and limits."""
    from broker.client import SwarmClient

    async def go() -> dict[str, Any]:
        async with SwarmClient(Settings().amqp_url.get_secret_value()) as client:
            return await client.status(timeout_s=15.0)

    try:
        answer = _run_async(go())
    except SwarmError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    from broker.status_view import render_status

    render_status(answer)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the wire contract (task, reply, control)."""
    from schemas.jsonschema import wire_schema

    json.dump(wire_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")


def main() -> None:  # pragma: no cover
    app()
