"""`swarm submit` and `swarm cancel`: one task by the command line, its reply or the daemon's
answer printed as JSON."""

import json
from typing import Annotated, Any

import typer

from broker.cli.common import client_for, fail, run_async, settings_or_exit
from schemas.errors import SwarmError

SUBMIT_EXIT_CODES = (
    "Exit status: 0 the reply is ok; 1 RabbitMQ could not be reached, did not take the task, "
    "or no reply came within --wait; 2 invalid input (nothing was sent); 3 the reply is not "
    "ok (error, expired or cancelled: printed as JSON all the same)."
)


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

    from broker.cli.submit_options import (
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

    settings = settings_or_exit()
    optional = task.model_dump(
        exclude_none=True, exclude={"v", "id", "type", "handler", "args", "timeout_s"}
    )

    def show_progress(message: Any) -> None:
        typer.echo(json.dumps(message.model_dump(mode="json"), default=str), err=True)

    async def go() -> dict[str, Any]:
        async with client_for(settings, one_shot=True) as client:
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
        result = run_async(go())
    except ReplyTimeout as exc:
        typer.echo(f"swarm: {exc}", err=True)
        typer.echo(
            f"swarm: task {task.id} may still run; `swarm cancel {task.id}` cancels it", err=True
        )
        raise typer.Exit(code=1) from None
    except SwarmError as exc:
        fail(exc)
    typer.echo(json.dumps(result, indent=2, default=str))
    if result["status"] != "ok":
        raise typer.Exit(code=3)


CANCEL_EXIT_CODES = (
    "Exit status: 0 the daemon will answer the task cancelled (it was waiting or running, or "
    "has not arrived yet and is remembered); 1 RabbitMQ could not be reached or no answer came "
    "within --wait; 2 invalid input; 3 too late: the task has finished or is finishing."
)


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
    settings = settings_or_exit()

    async def go() -> dict[str, Any]:
        async with client_for(settings, one_shot=True) as client:
            return await client.cancel(task_id, wait_s=wait_s)

    try:
        answer = run_async(go())
    except SwarmError as exc:
        fail(exc)
    typer.echo(json.dumps(answer, indent=2, default=str))
    if answer.get("state") in ("finished", "finishing"):
        raise typer.Exit(code=3)
