"""Fixtures on the real parts: a RabbitMQ vhost per test, one Ray for the session, daemons."""

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).parent))

from hardening import REPORTED
from rabbit import RabbitServer, rabbit_server
from raw import RawProducer

from broker.daemon import Daemon
from broker.settings import Settings

# Logical CPUs: the session's local Ray advertises more than the machine's cores so that
# several daemons' pools fit at once; tasks here are short.
SESSION_RAY_CPUS = 8


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The hardening suite's figures, one line per hostile case, whatever the verbosity."""
    if REPORTED:
        terminalreporter.section("hardening figures")
        for line in REPORTED:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitServer]:
    with rabbit_server() as server:
        yield server


@pytest.fixture
def amqp_url(rabbit: RabbitServer) -> Iterator[str]:
    with rabbit.fresh_vhost() as url:
        yield url


# Fast failure detection, so a removed node's actors are reported dead within seconds.
FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 4,
}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Cluster]:
    """One Ray for the whole run, as a `Cluster` so multi-node tests can add and remove
    worker nodes; in-process daemons drive it, subprocess daemons join it."""
    import ray

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": SESSION_RAY_CPUS,
            "include_dashboard": False,
            "_system_config": FAST_HEALTH_CHECKS,
        },
    )
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_cluster: Cluster) -> str:
    return str(ray_cluster.address)


DaemonFactory = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def start_daemon(amqp_url: str, ray_address: str) -> AsyncIterator[DaemonFactory]:
    """Start in-process daemons on this test's vhost; each is stopped at the end."""
    started: list[Daemon] = []

    async def start(**overrides: Any) -> Daemon:
        values: dict[str, Any] = {
            "amqp_url": amqp_url,
            "cpu_pool_min": 1,
            "cpu_pool_max": 1,
            "drain_timeout_s": 5.0,
            "metrics_port": 0,  # any free port: tests run many daemons on one host
        }
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


def when_waiting(daemon: Daemon, count: int) -> asyncio.Event:
    """An event set once `count` tasks of one queue wait for room in `daemon`'s scheduler
    (the scheduler's own hook, chained: the ingress still sees every change)."""
    reached = asyncio.Event()
    forward = daemon.scheduler.on_tag_waiting

    def watch(tag: str, waiting: int) -> None:
        forward(tag, waiting)
        if waiting >= count:
            reached.set()

    daemon.scheduler.on_tag_waiting = watch
    return reached
