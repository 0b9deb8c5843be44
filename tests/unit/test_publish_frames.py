"""The hot path frames its publishes itself (broker/amqp/pipelined.py `publish_frames`): byte for
byte what pamqp writes, for bodies empty, small and past frame_max, mandatory or not."""

import aiormq
import pamqp.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from broker.amqp.publish_framing import publish_frames

MAX_BODY = 64


def by_pamqp(
    channel: int,
    body: bytes,
    exchange: str,
    routing_key: str,
    properties: aiormq.spec.Basic.Properties,
    mandatory: bool,
) -> bytes:
    frames = [
        spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
        ContentHeader(0, len(body), properties),
        *(ContentBody(body[i : i + MAX_BODY]) for i in range(0, len(body), MAX_BODY)),
    ]
    return b"".join(pamqp.frame.marshal(frame, channel) for frame in frames)


names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    channel=st.integers(1, 65535),
    body=st.binary(max_size=5 * MAX_BODY),
    # pamqp refuses exchange names outside this alphabet (Swarm's are "" and swarm.*).
    exchange=st.text("abcXYZ019-_.:", max_size=40),
    routing_key=names,
    mandatory=st.booleans(),
    correlation_id=st.none() | names,
    headers=st.none() | st.dictionaries(names, st.integers(-(2**31), 2**31 - 1) | names),
)
def test_the_frames_are_pamqps(
    channel: int,
    body: bytes,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    correlation_id: str | None,
    headers: dict[str, object] | None,
) -> None:
    def properties() -> aiormq.spec.Basic.Properties:
        return aiormq.spec.Basic.Properties(
            content_type="application/msgpack",
            correlation_id=correlation_id,
            headers=headers,
            delivery_mode=2,
            message_id="m",
        )

    ours = publish_frames(channel, MAX_BODY, body, exchange, routing_key, properties(), mandatory)
    assert ours == by_pamqp(channel, body, exchange, routing_key, properties(), mandatory)


def test_a_name_past_a_short_string_is_refused() -> None:
    with pytest.raises(ValueError, match="short string"):
        publish_frames(1, MAX_BODY, b"", "", "q" * 256, aiormq.spec.Basic.Properties(), False)


def test_frame_max_zero_means_one_body_frame() -> None:
    """RabbitMQ may tune frame_max to 0 (no limit): the whole body follows in one frame."""
    properties = aiormq.spec.Basic.Properties(delivery_mode=2, message_id="m")
    body = bytes(range(256)) * 40
    ours = publish_frames(7, 0, body, "", "q", properties, False)
    expected = b"".join(
        pamqp.frame.marshal(frame, 7)
        for frame in (
            spec.Basic.Publish(exchange="", routing_key="q"),
            ContentHeader(0, len(body), properties),
            ContentBody(body),
        )
    )
    assert ours == expected
