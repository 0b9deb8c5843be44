"""The daemon as a separate process (`swarm run`), for tests that kill or signal it."""

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

SWARM = str(Path(sys.executable).with_name("swarm"))


class DaemonProcess:
    def __init__(self, amqp_url: str, ray_address: str, **settings: Any) -> None:
        self.env = {
            **os.environ,
            "AMQP_URL": amqp_url,
            "RAY_ADDRESS": ray_address,
            "SWARM_LOG_FORMAT": "json",
            "SWARM_METRICS_PORT": "0",
            "SWARM_CPU_POOL_MIN": "1",
        }
        self.env.update({f"SWARM_{key.upper()}": str(value) for key, value in settings.items()})
        self.process: asyncio.subprocess.Process | None = None
        self.log: list[dict[str, Any]] = []
        self.other: list[str] = []
        self._logged = asyncio.Condition()

    async def start(self, timeout_s: float = 120.0) -> "DaemonProcess":
        self.process = await asyncio.create_subprocess_exec(
            SWARM,
            "run",
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.wait_for(self._until("daemon_ready"), timeout_s)
        self._reader = asyncio.create_task(self._until(None))
        return self

    async def launch(self) -> "DaemonProcess":
        """Start it and read its lines, without waiting until it is ready (for tests of the
        start-up itself: `logged` waits for what they need)."""
        self.process = await asyncio.create_subprocess_exec(
            SWARM,
            "run",
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._until(None))
        return self

    async def _until(self, event: str | None) -> None:
        assert self.process is not None and self.process.stderr is not None
        while line := await self.process.stderr.readline():
            try:
                entry = json.loads(line)
            except ValueError:
                self.other.append(line.decode(errors="replace").rstrip())  # Ray's own lines
                continue
            async with self._logged:
                self.log.append(entry)
                self._logged.notify_all()
            if event is not None and entry.get("event") == event:
                return
        if event is not None:
            raise RuntimeError(f"daemon exited before {event!r}: {self.log[-5:]}")

    async def logged(self, event: str, count: int = 1, timeout_s: float = 120.0) -> None:
        """Wait until the daemon has logged `event` `count` times."""

        def seen() -> bool:
            return sum(1 for entry in self.log if entry.get("event") == event) >= count

        async def wait() -> None:
            async with self._logged:
                await self._logged.wait_for(seen)

        await asyncio.wait_for(wait(), timeout_s)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        try:
            return await asyncio.wait_for(self.process.wait(), timeout_s)
        except asyncio.TimeoutError:
            events = [entry.get("event") for entry in self.log[-12:]]
            raise AssertionError(
                f"the daemon did not exit within {timeout_s:g} s; last events {events}; "
                "other output:\n" + "\n".join(self.other[-20:])
            ) from None
