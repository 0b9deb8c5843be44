"""Connecting to one RabbitMQ node, TLS via amqps:// URLs (broker/amqp/nodes.py picks the
node when there are several); a refusal said in one line that tells what to do."""

import urllib.parse

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection

from broker.amqp.urls import redact
from broker.errors import AmqpLoginRefused, AmqpUnavailable, AmqpVhostRefused

__all__ = ["connect", "redact"]


async def connect(url: str, *, name: str = "swarm") -> AbstractConnection:
    """Open a connection; a clear AmqpUnavailable when it cannot be (AmqpLoginRefused,
    AmqpVhostRefused when RabbitMQ answered but said no). Not aio-pika's robust connection:
    its restore did not survive a RabbitMQ restart here, so the daemon and the client rebuild
    their whole session themselves when a connection drops."""
    try:
        return await aio_pika.connect(url, client_properties={"connection_name": name})
    except Exception as exc:  # aiormq/OSError/asyncio errors for refused, DNS, auth, TLS
        raise refusal(url, exc) from exc


def refusal(url: str, exc: Exception) -> AmqpUnavailable:
    """What a failed connection attempt means for the operator, in one line."""
    where = redact(url)
    parts = urllib.parse.urlsplit(url)
    user = urllib.parse.unquote(parts.username or "guest")
    vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return AmqpLoginRefused(
            f"RabbitMQ at {where} refused the login of user {user!r}: wrong user name or "
            "password. Fix the credentials in AMQP_URL (or create the user: "
            f"`rabbitmqctl add_user {user} ...`)."
        )
    # RabbitMQ closes the connection in answer to connection.open when the virtual host does
    # not exist or the user may not use it (530 NOT_ALLOWED); aiormq reports it as an
    # unexpected frame and keeps no reply text, so the two cannot be told apart here.
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        return AmqpVhostRefused(
            f"RabbitMQ at {where} refused virtual host {vhost!r} to user {user!r}: it does "
            f"not exist or the user has no permissions on it. Create it (`rabbitmqctl "
            f"add_vhost {vhost}`) and grant them (`rabbitmqctl set_permissions -p {vhost} "
            f"{user} '.*' '.*' '.*'`), or fix the virtual host in AMQP_URL."
        )
    return AmqpUnavailable(
        f"cannot reach RabbitMQ at {where}: {type(exc).__name__}: {exc}. "
        "Start it (`rabbitmq-server -detached`, or `docker compose up rabbitmq`) "
        "or point AMQP_URL at a running broker."
    )
