"""Fixtures on the real parts: a RabbitMQ vhost per test, one Ray for the session, daemons."""

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from rabbit import RabbitServer, rabbit_server
from raw import RawProducer

from broker.daemon import Daemon
from broker.settings import Settings

# Logical CPUs: the session's local Ray advertises more than the machine's cores so that
# several daemons' pools fit at once; tasks here are short.
SESSION_RAY_CPUS = 8


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitServer]:
    with rabbit_server() as server:
        yield server


@pytest.fixture
def amqp_url(rabbit: RabbitServer) -> Iterator[str]:
    with rabbit.fresh_vhost() as url:
        yield url


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """One local Ray for the whole run; in-process daemons use it, subprocesses join it."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], include_dashboard=False)
    else:
        ray.init(num_cpus=SESSION_RAY_CPUS, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


DaemonFactory = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def start_daemon(amqp_url: str, ray_address: str) -> AsyncIterator[DaemonFactory]:
    """Start in-process daemons on this test's vhost; each is stopped at the end."""
    started: list[Daemon] = []

    async def start(**overrides: Any) -> Daemon:
        values: dict[str, Any] = {"amqp_url": amqp_url, "cpu_pool_size": 1, "drain_timeout_s": 5.0}
        values.update(overrides)
        daemon = Daemon(Settings(**values))
        await daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in reversed(started):
        await daemon.stop()


@pytest.fixture
async def daemon(start_daemon: DaemonFactory) -> Daemon:
    return await start_daemon()


@pytest.fixture
async def producer(amqp_url: str) -> AsyncIterator[RawProducer]:
    async with RawProducer(amqp_url) as raw:
        yield raw
