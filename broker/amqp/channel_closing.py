"""When RabbitMQ has closed an aiormq channel, known before aiormq says so.

Why: the hot path writes frames itself (broker/amqp/turn_writer.py), past aiormq's own checks,
so it must stop writing on a channel the moment RabbitMQ closed it: a frame sent after our
CloseOk makes RabbitMQ close the whole connection (504). aiormq sets a private event then,
before `is_closed` turns true; it is read here, in one place, and loudly, so that an aiormq
upgrade that changes it fails at once instead of silently.
"""

import asyncio

import aiormq


def close_event(channel: aiormq.abc.AbstractChannel) -> asyncio.Event:
    """Set when RabbitMQ closed the channel, before `is_closed` turns true: a frame sent after
    our CloseOk makes RabbitMQ close the whole connection (504), so nothing goes then."""
    event = getattr(channel, "_Channel__close_event", None)
    if not isinstance(event, asyncio.Event):
        raise RuntimeError(
            "aiormq's channel changed: broker/amqp/channel_closing.py needs updating"
        )
    return event
