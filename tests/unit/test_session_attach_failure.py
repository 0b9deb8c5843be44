"""A session whose outcome replay fails (past its stall limit, its connection dropped) is
closed, with the store's stream consumer on it: each reconnect attempt used to leave one
connection behind, still consuming the outcome stream."""

import asyncio
from typing import Any

import pytest

from broker.amqp import ingress as ingress_module
from broker.amqp.ingress import Ingress
from broker.amqp.outcome_replay import OutcomeReplayError
from broker.amqp.outcomes import OutcomeStore


class FakeSession:
    def __init__(self) -> None:
        self.connection = object()
        self.publish_channel = object()
        self.consume_channel = object()
        self.lost = asyncio.Event()
        self.closed = False

    async def close(self) -> None:
        self.closed = True


class ReplayFails(OutcomeStore):
    """Attaching starts the stream consumer on the session's connection, then the replay
    fails, as it does past REPLAY_STALL_S."""

    def __init__(self) -> None:
        super().__init__(retention_s=60)
        self.consuming = 0

    async def attach(self, connection: Any, publish_channel: Any, on_lost: Any = None) -> None:
        self.consuming += 1
        raise OutcomeReplayError("no record for 120 s while replaying")

    async def detach(self) -> None:
        self.consuming = max(0, self.consuming - 1)


async def test_a_session_whose_replay_fails_is_closed_with_its_stream_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sessions: list[FakeSession] = []

    async def open_session(url: str, prefetch: int) -> FakeSession:
        sessions.append(FakeSession())
        return sessions[-1]

    monkeypatch.setattr(ingress_module.AmqpSession, "open", open_session)
    store = ReplayFails()

    async def process(_: Any) -> Any:
        raise AssertionError("nothing is delivered")

    ingress = Ingress("amqp://unused/", 1, process, process, store, lambda outcome: None)
    for _ in range(3):  # the first start and two reconnect attempts
        with pytest.raises(OutcomeReplayError):
            await ingress._open_session()
    assert [s.closed for s in sessions] == [True, True, True]
    assert store.consuming == 0
    assert not ingress.consuming
