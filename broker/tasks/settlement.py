"""How one delivery is settled: a small state machine, so that a double ack shows.

    RECEIVED --ack------> ACKED        the outcome is published (the ingress)
    RECEIVED --requeue--> REQUEUED     no outcome: another delivery runs it (the ingress)
    RECEIVED --hold-----> HELD         a renewal copy (or redelivery) of a task running here:
                                       its body let go, settled with that task
    RECEIVED --renewed--> REPLACED     acked early: a renewal copy now carries the task
    HELD     --ack------> ACKED        at the next renewal, or with the task's outcome
    HELD     --requeue--> REQUEUED     the task ended without an outcome
    REPLACED --ack------> ACKED        the task ended: nothing more goes to RabbitMQ, the copy
    REPLACED --requeue--> REQUEUED     that replaced it is settled with the task

Any other call raises SettlementError: a second ack, a requeue after an ack, a hold of a
delivery already settled. RabbitMQ would answer most of these by closing the channel (an
unknown delivery tag), taking every other delivery on it along; here they fail where the bug is.

The transport (AMQP in broker/amqp/ingress.py, fakes in tests) implements `_send_ack`,
`_send_requeue` and, optionally, `_let_go_of_body`; the state is kept here alone.
"""

import enum

from broker.errors import SettlementError


class SettleState(enum.Enum):
    RECEIVED = "received"
    HELD = "held"
    REPLACED = "replaced"
    ACKED = "acked"
    REQUEUED = "requeued"


_S = SettleState
# (state, action) -> (next state, whether RabbitMQ hears of it)
_TRANSITIONS: dict[tuple[SettleState, str], tuple[SettleState, bool]] = {
    (_S.RECEIVED, "ack"): (_S.ACKED, True),
    (_S.RECEIVED, "requeue"): (_S.REQUEUED, True),
    (_S.RECEIVED, "hold"): (_S.HELD, False),
    (_S.RECEIVED, "renewed"): (_S.REPLACED, True),
    (_S.HELD, "ack"): (_S.ACKED, True),
    (_S.HELD, "requeue"): (_S.REQUEUED, True),
    (_S.REPLACED, "ack"): (_S.ACKED, False),
    (_S.REPLACED, "requeue"): (_S.REQUEUED, False),
}


class Settlement:
    """The transport's handle on one delivery, and where it stands."""

    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state = SettleState.RECEIVED

    @property
    def state(self) -> SettleState:
        return self._state

    @property
    def settled(self) -> bool:
        return self._state in (SettleState.ACKED, SettleState.REQUEUED)

    def _move(self, action: str) -> bool:
        """Enter the state `action` leads to (before any await: a second caller racing this
        one sees the new state); True when RabbitMQ is to be told."""
        step = _TRANSITIONS.get((self._state, action))
        if step is None:
            raise SettlementError(self._state.value, action)
        self._state, on_the_wire = step
        return on_the_wire

    async def ack(self) -> None:
        if self._move("ack"):
            await self._send_ack()

    async def requeue(self) -> None:
        if self._move("requeue"):
            await self._send_requeue()

    async def renewed(self) -> None:
        """Acknowledge a delivery still being processed: its renewal copy is queued, so the
        task's message is the copy now. Its processing settles it later without a word to
        RabbitMQ."""
        if self._move("renewed"):
            await self._send_ack()

    def hold(self) -> None:
        """Handed to the task running here, which settles it (see TaskProcessor); the body is
        let go, since settling needs only the delivery tag."""
        self._move("hold")
        self._let_go_of_body()

    async def _send_ack(self) -> None:
        raise NotImplementedError

    async def _send_requeue(self) -> None:
        raise NotImplementedError

    def _let_go_of_body(self) -> None:
        """Drop the transport's reference to the body, where it keeps one."""
