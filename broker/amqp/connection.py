"""Connecting to one RabbitMQ node, TLS via amqps:// URLs (broker/amqp/nodes.py picks the
node when there are several)."""

import aio_pika
from aio_pika.abc import AbstractConnection

from broker.amqp.urls import redact
from broker.errors import AmqpUnavailable

__all__ = ["connect", "redact"]


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
