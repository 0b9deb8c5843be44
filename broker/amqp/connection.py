"""Connecting to RabbitMQ: robust (reconnecting) connections, TLS via amqps:// URLs."""

import aio_pika
from aio_pika.abc import AbstractConnection

from broker.errors import AmqpUnavailable


def redact(url: str) -> str:
    """The URL with its password replaced, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


async def connect(url: str, *, name: str = "swarm") -> AbstractConnection:
    """Open a connection; a clear AmqpUnavailable when RabbitMQ is not there. Not aio-pika's
    robust connection: its restore did not survive a RabbitMQ restart here, so the daemon and
    the client rebuild their whole session themselves when a connection drops."""
    try:
        return await aio_pika.connect(url, client_properties={"connection_name": name})
    except Exception as exc:  # aiormq/OSError/asyncio errors for refused, DNS, auth, TLS
        raise AmqpUnavailable(
            f"cannot reach RabbitMQ at {redact(url)}: {type(exc).__name__}: {exc}. "
            "Start it (`rabbitmq-server -detached`, or `docker compose up rabbitmq`) "
            "or point AMQP_URL at a running broker."
        ) from exc
