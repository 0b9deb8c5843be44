"""The control queue, spoken with raw aio-pika."""

import aio_pika
import msgpack
from raw import RawProducer

from broker.daemon import Daemon


async def _ask(producer: RawProducer, body: bytes) -> dict[str, object]:
    inbox = await producer.inbox()
    await producer.channel.default_exchange.publish(
        aio_pika.Message(
            body, content_type="application/msgpack", reply_to=inbox.name, correlation_id="ctl-1"
        ),
        "swarm.control",
    )
    reply = await inbox.one()
    assert reply.message.correlation_id == "ctl-1"
    return reply.payload  # type: ignore[no-any-return]


async def test_status_answers_with_pools_nodes_queues_limits(
    daemon: Daemon, producer: RawProducer
) -> None:
    payload = await _ask(producer, msgpack.packb({"v": 1, "op": "status"}))
    assert payload["status"] == "ok"
    assert payload["id"] is None
    result = payload["result"]
    assert isinstance(result, dict)
    assert result["pools"]["cpu"]["actors"] == 1
    assert result["pools"]["cpu"]["waiting"] == 0
    assert result["queues"]["swarm.tasks.inference"] == 0


async def test_bad_control_request_is_invalid(daemon: Daemon, producer: RawProducer) -> None:
    payload = await _ask(producer, msgpack.packb({"v": 1, "op": "reboot"}))
    assert payload["status"] == "error"
    assert payload["error"]["code"] == "invalid"  # type: ignore[index]


async def test_garbage_control_request_is_invalid(daemon: Daemon, producer: RawProducer) -> None:
    payload = await _ask(producer, b"\xc1")
    assert payload["error"]["code"] == "invalid"  # type: ignore[index]
