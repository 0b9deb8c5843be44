"""`swarm console`: serve the operator console (broker/console/) until Ctrl-C.

Bound to 127.0.0.1 unless told; bound anywhere else it refuses to start without a token
(SWARM_CONSOLE_TOKEN, or `console_token` in the settings file: never on the command line,
where every user of the machine could read it). Exit status: 0 stopped, 2 refused to start.
"""

from typing import Annotated

import typer

from broker.console.auth import is_loopback


def console(
    host: Annotated[
        str | None, typer.Option("--host", help="address to bind (SWARM_CONSOLE_HOST)")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="port (SWARM_CONSOLE_PORT; 0 any free port)")
    ] = None,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="look only: no cancel, replay or purge")
    ] = False,
    metrics_url: Annotated[
        str | None,
        typer.Option("--metrics-url", help="the daemon's /metrics (SWARM_CONSOLE_METRICS_URL)"),
    ] = None,
) -> None:
    """Serve the operator console in the browser: overview, cluster, queues, tasks, dead
    letters. Exit status: 0 stopped, 2 refused to start (a bind beyond loopback without
    SWARM_CONSOLE_TOKEN)."""
    import uvicorn

    from broker.cli.common import settings_or_exit
    from broker.console.app import ConsoleConfig, create_app

    settings = settings_or_exit()
    bind = host if host is not None else settings.console_host
    token = settings.console_token.get_secret_value() if settings.console_token else None
    if not is_loopback(bind) and not token:
        typer.echo(
            f"swarm: the console binds {bind}, beyond loopback: set SWARM_CONSOLE_TOKEN "
            "(every request must then carry it), or bind 127.0.0.1",
            err=True,
        )
        raise typer.Exit(code=2)
    config = ConsoleConfig(
        amqp_url=settings.amqp_url.get_secret_value(),
        metrics_url=metrics_url or settings.console_metrics_url,
        token=token,
        read_only=read_only,
        interval_s=settings.console_interval_s,
        amqp_shuffle=settings.amqp_shuffle,
    )
    chosen_port = port if port is not None else settings.console_port
    typer.echo(
        f"swarm console on http://{bind}:{chosen_port}/"
        + (" (read-only)" if read_only else "")
        + (" (token required)" if token else ""),
        err=True,
    )
    uvicorn.run(
        create_app(config),
        host=bind,
        port=chosen_port,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
