"""What the `swarm` commands share: the settings or one clear line, a producers' client, an
event loop (uvloop where installed), and the one-line failure."""

import asyncio
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from broker.settings import Settings
from broker.settings_loader import load_settings

if TYPE_CHECKING:
    from broker.producer.client import SwarmClient


def fail(exc: BaseException) -> NoReturn:
    typer.echo(f"swarm: {exc}", err=True)
    raise typer.Exit(code=1)


def settings_or_exit() -> Settings:
    """The settings, or one clear line and exit 2 when they are not valid."""
    try:
        return load_settings()
    except (ValueError, OSError) as exc:  # SettingsInvalid is a ValueError
        typer.echo(f"swarm: invalid configuration: {exc}", err=True)
        raise typer.Exit(code=2) from None


def client_for(settings: Settings, *, one_shot: bool = False) -> "SwarmClient":
    """A producers' client on the nodes of AMQP_URL (in the order SWARM_AMQP_SHUFFLE says).
    `one_shot`: a command that exits once answered; its reply queue is deleted on the way
    out, even when a reply did not come in time (no one would ever read it)."""
    from broker.producer.client import SwarmClient

    return SwarmClient(
        settings.amqp_url.get_secret_value(),
        shuffle=settings.amqp_shuffle,
        delete_reply_queue=True if one_shot else None,
    )


def run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
