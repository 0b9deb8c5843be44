"""Per-actor set-up of handlers: run once, before the first task that needs it, and kept.

Lazy, so that an actor pays only for the handlers it is actually sent (an inference model is
not loaded by a CPU actor that only ever runs data processing). A failed set-up is not kept:
the task that triggered it fails with `handler_error`, and the next task tries again.
"""

import asyncio
from collections.abc import Callable
from typing import Any

from workers.context import ActorContext
from workers.registry import HandlerSpec


class Setups:
    def __init__(self, actor: ActorContext) -> None:
        self._actor = actor
        self._states: dict[Callable[[Any], Any], Any] = {}
        self._locks: dict[Callable[[Any], Any], asyncio.Lock] = {}

    async def state_for(self, spec: HandlerSpec) -> Any:
        setup = spec.setup
        if setup is None:
            return None
        if setup in self._states:
            return self._states[setup]
        lock = self._locks.setdefault(setup, asyncio.Lock())
        async with lock:  # concurrent first tasks wait for one set-up, not one each
            if setup not in self._states:
                if asyncio.iscoroutinefunction(setup):
                    state = await setup(self._actor)
                else:
                    state = await asyncio.to_thread(setup, self._actor)
                self._states[setup] = state
        return self._states[setup]
