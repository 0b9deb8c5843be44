"""Errors of the worker side: handler configuration and the Ray execution edge."""

from schemas.errors import SwarmError


class WorkerError(SwarmError):
    """Base of errors raised by pools and handlers' machinery."""


class HandlerConfigError(WorkerError):
    """A handler declaration or handler module is wrong; raised at start-up."""


class WorkerLost(WorkerError):
    """The actor running a task died (process crash, node loss)."""

    def __init__(self, actor: str, reason: str) -> None:
        super().__init__(f"worker {actor} was lost: {reason}")
        self.actor = actor
        self.reason = reason


class PoolStartError(WorkerError):
    """A pool's actors could not be created on the cluster."""
