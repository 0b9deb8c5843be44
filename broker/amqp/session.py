"""One AMQP connection's worth of the daemon: its channels, the declared topology, the
publisher. When the connection drops, the ingress throws the session away and opens another."""

import asyncio
import contextlib

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from broker.amqp.acks import Acks
from broker.amqp.connection import connect
from broker.amqp.deliveries import Deliveries
from broker.amqp.frames import tolerant_frames
from broker.amqp.pipelined import PipelinedChannel
from broker.amqp.publisher import Publisher
from broker.amqp.topology import Topology, declare
from broker.amqp.turn_writer import TurnWriter

# How long a clean close waits for the frames already handed to the writer.
DRAIN_AT_CLOSE_S = 2.0


class AmqpSession:
    def __init__(
        self,
        connection: AbstractConnection,
        publish_channel: AbstractChannel,
        consume_channel: AbstractChannel,
        reply_channel: AbstractChannel,
        topology: Topology,
        writer: TurnWriter,
        pipelined: PipelinedChannel,
        acks: Acks,
        deliveries: Deliveries,
    ) -> None:
        self.connection = connection
        self.publish_channel = publish_channel
        self.consume_channel = consume_channel
        self.topology = topology
        self.writer = writer
        # The hot path (broker/amqp/pipelined.py): replies, their copies and outcome records go
        # on a confirm channel of their own; deliveries of consume_channel are acked here.
        self.acks = acks
        self.deliveries = deliveries
        self.publisher = Publisher(publish_channel, pipelined, topology.results, topology.dead)
        self.lost = asyncio.Event()
        # A channel RabbitMQ closed (a 404 on a deleted exchange, a refused permission) is as
        # good as a lost connection: the session is rebuilt, and declares the topology again.
        for closable in (connection, publish_channel, consume_channel, reply_channel):
            closable.close_callbacks.add(lambda *_: self.lost.set())

    @classmethod
    async def open(cls, url: str, prefetch: int) -> "AmqpSession":
        """Connect, declare the topology, open a confirm channel for publishing and a channel
        with the prefetch window for consuming. Raises AmqpUnavailable."""
        # A message whose properties cannot be decoded must not kill the connection that
        # carries every queue: this connection's content headers are decoded tolerantly.
        with tolerant_frames():
            connection = await connect(url, name="swarm-daemon")
        try:
            publish_channel = await connection.channel(publisher_confirms=True)
            topology = await declare(publish_channel)
            consume_channel = await connection.channel()
            await consume_channel.set_qos(prefetch_count=prefetch)
            reply_channel = await connection.channel(publisher_confirms=True)
            reply_underlay = await reply_channel.get_underlay_channel()
            writer = TurnWriter(reply_underlay.write_queue)
            pipelined = PipelinedChannel(reply_underlay, writer)
            consume_underlay = await consume_channel.get_underlay_channel()
            acks = Acks(consume_underlay, writer)
            deliveries = Deliveries(consume_underlay, acks)
        except BaseException:
            await connection.close()
            raise
        return cls(
            connection,
            publish_channel,
            consume_channel,
            reply_channel,
            topology,
            writer,
            pipelined,
            acks,
            deliveries,
        )

    async def close(self) -> None:
        if not self.connection.is_closed and not self.lost.is_set():
            # The last turn's acks (fire and forget on the hot path) reach the socket first.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.drain(), DRAIN_AT_CLOSE_S)
        self.writer.close()
        if not self.connection.is_closed:
            await self.connection.close()


# What a publish raises when the connection under it is gone.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPConnectionError,
    aio_pika.exceptions.ChannelInvalidStateError,
    ConnectionError,
    RuntimeError,
)
