"""The systems under test, each started on a fresh vhost as a process of its own.

- `reference`: bench/reference.py, the least a daemon must do (see that file).
- `swarm`: `swarm run` with the built-in `echo` handler, ready once it answers `status`.
- `ray-glue`: bench/ray_glue.py, the reference plus one awaited Ray actor call per task.
- `celery`, `dramatiq`: the same no-op through them (bench/extras.py), when importable.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from client import RAY_GLUE, REFERENCE, SWARM, BenchError, Codec, LoadClient
from procs import (
    CLOCK_TICKS,
    RssSampler,
    SharedRay,
    embedded_actors,
    ray_auth_mode,
    read_proc,
    stop_process,
    tool,
)

HERE = Path(__file__).resolve().parent
READY_TIMEOUT_S = 240.0


class System:
    name = ""
    codec: Codec

    def __init__(self, log_dir: Path, tag: str) -> None:
        self.log_dir = log_dir
        self.tag = tag
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _spawn(self, command: list[str], env: dict[str, str]) -> None:
        self.log_path = self.log_dir / f"{self.name}-{self.tag}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped by its id
                cwd=HERE.parent,
            )
        self.started_at = time.monotonic()

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise BenchError(
                f"{self.name} exited with {self.process.returncode} before it was ready; "
                f"see {self.log_path}"
            )

    async def start(self, url: str) -> None:
        raise NotImplementedError

    async def wait_ready(self, client: LoadClient) -> float:
        """Seconds from the spawn until the system answered; raises if it never did."""
        raise NotImplementedError

    def sampler(self) -> RssSampler:
        return RssSampler(self.pid, set)

    async def describe(self, client: LoadClient) -> dict[str, Any]:
        return {}

    def stop(self) -> int | None:
        if self.process is None:
            return None
        return stop_process(self.process, grace_s=60.0)


def bench_env(**extra: str) -> dict[str, str]:
    """The bench's environment minus any Swarm, AMQP or Ray settings, plus `extra`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SWARM_", "RAY_")) and key != "AMQP_URL"
    }
    env.update(extra)
    return env


class Reference(System):
    name = "reference"
    codec = REFERENCE

    async def start(self, url: str) -> None:
        self._spawn([sys.executable, str(HERE / "reference.py"), url], bench_env())

    async def wait_ready(self, client: LoadClient) -> float:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive()
            if "ready" in self.log_path.read_text(errors="replace").splitlines():
                return time.monotonic() - self.started_at
            await asyncio.sleep(0.05)
        raise BenchError(f"the reference server was not ready within {READY_TIMEOUT_S:g} s")


class Swarm(System):
    name = "swarm"
    codec = SWARM

    def __init__(
        self,
        log_dir: Path,
        tag: str,
        ray: SharedRay | None,
        ray_cpus: int,
        model_dir: Path | None = None,
    ) -> None:
        super().__init__(log_dir, tag)
        self.ray = ray
        self.ray_cpus = ray_cpus
        self.model_dir = model_dir
        self.start_ticks = 0

    async def start(self, url: str) -> None:
        env = bench_env(
            AMQP_URL=url,
            SWARM_LOG_LEVEL="warning",
            SWARM_METRICS_PORT="0",
            SWARM_LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
            RAY_AUTH_MODE=ray_auth_mode(),
        )
        if self.ray is not None:
            env["RAY_ADDRESS"] = self.ray.address
        else:
            # "local": never join a `ray start` cluster that someone else runs on this machine.
            env["RAY_ADDRESS"] = "local"
            env["SWARM_RAY_NUM_CPUS"] = str(self.ray_cpus)
        if self.model_dir is not None:
            env["SWARM_MODEL_DIR"] = str(self.model_dir)  # where `predict` finds the bench's
        self._spawn([tool("swarm"), "run"], env)
        info = read_proc(self.pid)
        self.start_ticks = info.start_ticks if info is not None else 0

    async def wait_ready(self, client: LoadClient) -> float:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive()
            if await client.control_status(timeout_s=2.0) is not None:
                return time.monotonic() - self.started_at
            await asyncio.sleep(0.2)
        raise BenchError(f"the daemon did not answer `status` within {READY_TIMEOUT_S:g} s")

    def sampler(self) -> RssSampler:
        return ray_sampler(self.pid, self.ray, self.start_ticks)

    async def describe(self, client: LoadClient) -> dict[str, Any]:
        status = await client.control_status(timeout_s=15.0) or {}
        pools = status.get("pools", {})
        return {"pool_actors": {name: view.get("actors") for name, view in pools.items()}}


class RayGlue(Reference):
    name = "ray-glue"
    codec = RAY_GLUE

    def __init__(self, log_dir: Path, tag: str, ray: SharedRay | None, ray_cpus: int) -> None:
        super().__init__(log_dir, tag)
        self.ray = ray
        self.ray_cpus = ray_cpus
        self.start_ticks = 0

    async def start(self, url: str) -> None:
        env = bench_env(PYTHONUNBUFFERED="1", RAY_AUTH_MODE=ray_auth_mode())
        env["RAY_ADDRESS"] = self.ray.address if self.ray is not None else "local"
        env["BENCH_RAY_CPUS"] = str(self.ray_cpus)
        self._spawn([sys.executable, str(HERE / "ray_glue.py"), url], env)
        info = read_proc(self.pid)
        self.start_ticks = info.start_ticks if info is not None else 0

    def sampler(self) -> RssSampler:
        return ray_sampler(self.pid, self.ray, self.start_ticks)


def ray_sampler(pid: int, ray: SharedRay | None, start_ticks: int) -> RssSampler:
    """RSS of a process and of its Ray actors: in the shared Ray, those started after it
    (less a tick: /proc start times are in clock ticks); else those under it."""
    if ray is not None:
        shared = ray
        since = max(0, start_ticks - CLOCK_TICKS // 10)
        return RssSampler(pid, lambda: shared.actors_since(since))
    return RssSampler(pid, lambda: embedded_actors(pid))


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def make_system(
    name: str,
    log_dir: Path,
    tag: str,
    ray: SharedRay | None,
    ray_cpus: int,
    model_dir: Path | None = None,
) -> System:
    if name == "reference":
        return Reference(log_dir, tag)
    if name == "swarm":
        return Swarm(log_dir, tag, ray, ray_cpus, model_dir)
    if name == "ray-glue":
        return RayGlue(log_dir, tag, ray, ray_cpus)
    if name in ("celery", "dramatiq"):
        import extras

        return extras.make(name, log_dir, tag)
    raise ValueError(f"unknown system {name!r}")
