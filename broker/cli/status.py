"""`swarm status`: the daemon's pools, nodes, queues and limits, once or live."""

import asyncio
import json
from typing import Annotated, Any

import typer

from broker.cli.common import client_for, fail, run_async, settings_or_exit
from broker.settings import Settings
from schemas.errors import SwarmError

STATUS_EXIT_CODES = (
    "Exit status: 0 answered (with --watch: stopped by --count or Ctrl-C); 1 RabbitMQ could "
    "not be reached or no answer came in time; 2 invalid configuration."
)


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
    settings = settings_or_exit()
    if not watch:

        async def once() -> dict[str, Any]:
            async with client_for(settings, one_shot=True) as client:
                return await client.status(wait_s=15.0)

        try:
            answer = run_async(once())
        except SwarmError as exc:
            fail(exc)
        if as_json:
            typer.echo(json.dumps(answer, indent=2))
            return
        from broker.ops.status_view import render_status

        render_status(answer)
        return
    try:
        run_async(_watch_status(settings, interval_s, count, as_json))
    except SwarmError as exc:
        fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(code=0) from None


async def _watch_status(
    settings: Settings, interval_s: float, count: int | None, as_json: bool
) -> None:
    """One connection, a status request every `interval_s`, the tables redrawn in place."""
    import time

    from rich.live import Live

    from broker.ops.status_view import status_view

    async with client_for(settings, one_shot=True) as client:
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
