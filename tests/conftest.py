"""Fixtures on the real parts: a RabbitMQ vhost per test, one Ray for the session, daemons."""

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import structlog
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).parent))

from hardening import REPORTED
from rabbit import RabbitServer, rabbit_server
from raw import RawProducer

from broker.daemon import Daemon
from broker.settings import Settings
from broker.tasks.delivery import Delivery
from broker.tasks.outcome import Outcome

# Logical CPUs: the session's local Ray advertises more than the machine's cores so that
# several daemons' pools fit at once; tasks here are short.
SESSION_RAY_CPUS = 8


# -- what CI must have -------------------------------------------------------------------------
# Tools the CI machine has. Where one is missing, a test that needs it fails under CI (the
# environment variable CI set, as CI services and .ci/run set it) and skips elsewhere, so a
# whole suite cannot drop out of a CI run unnoticed. Optional extras (torch, a CUDA device)
# are not listed: their tests skip everywhere, with a reason.
CI_TOOLS = ("rabbitmqctl", "node", "npm", "docker-compose", "docker compose", "chromium")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_requirement(reason: str) -> NoReturn:
    """Skip for `reason`; under CI, fail instead: CI has everything these tests need."""
    if in_ci():
        pytest.fail(f"{reason} (CI must provide it: a skip here would hide the test)", False)
    pytest.skip(reason)


def have_tool(name: str) -> bool:
    """`name` is on PATH; "docker compose" is Docker's compose plugin, answering `version`."""
    if name == "docker compose":
        if shutil.which("docker") is None:
            return False
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
        )
        return probe.returncode == 0
    return shutil.which(name) is not None


def require_tool(*names: str, why: str = "") -> None:
    """Skip unless every tool in `names` is on PATH; a failure under CI (CI_TOOLS only)."""
    unknown = [name for name in names if name not in CI_TOOLS]
    assert not unknown, f"{unknown} are not CI tools: skip for optional extras directly"
    missing = [name for name in names if not have_tool(name)]
    if missing:
        missing_requirement(f"{', '.join(missing)} not on PATH" + (f": {why}" if why else ""))


def pytest_configure(config: pytest.Config) -> None:
    _plain_structlog()
    config.addinivalue_line(
        "markers",
        "requires_tool(*names): skip without these CI tools on PATH; under CI, fail instead",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("requires_tool"):
        require_tool(*marker.args, why=str(marker.kwargs.get("why", "")))


def _plain_structlog() -> None:
    """Daemons started inside the test process log through structlog's defaults, whose console
    renderer formats a traceback with rich, every local variable included: for a traceback
    through aiormq that takes minutes and gigabytes, holding the event loop (a debug line of a
    failed reconnect stopped the daemon's reconnecting). Plain tracebacks, debug lines kept,
    no caching (structlog.testing.capture_logs must still see every logger)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=True),
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            ),
        ],
        cache_logger_on_first_use=False,
    )


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


def when_delivered(daemon: Daemon, count: int) -> asyncio.Event:
    """An event set once `daemon`'s processor was handed `count` task deliveries in all (a task
    and its renewal copies, say); the processor's own method, chained."""
    reached = asyncio.Event()
    forward = daemon.tasks.process
    seen = 0

    async def process(delivery: Delivery) -> Outcome:
        nonlocal seen
        seen += 1
        if seen >= count:
            reached.set()
        return await forward(delivery)

    daemon.tasks.process = process  # type: ignore[method-assign]
    return reached


# -- runs journaled by workers.diagnostics (`wait_file` with `journal`) -----------------------
def journaled(path: Path) -> list[tuple[str, int]]:
    """(`started` | `finished`, actor pid) per line the runs wrote, in order."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        event, pid = line.split()
        entries.append((event, int(pid)))
    return entries


async def until_journaled(path: Path, count: int, timeout_s: float = 60.0) -> list[tuple[str, int]]:
    """Wait until the journal has `count` lines (another process writes it: the file is the
    only signal there is, so this polls)."""
    await until(lambda: len(journaled(path)) >= count, f"{count} lines in {path}", timeout_s)
    return journaled(path)


async def until(
    done: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = 60.0
) -> None:
    """Poll `done` until it holds, for state that no event reports (Ray's actor table, a
    daemon's connection state); AssertionError naming `what` past `timeout_s`."""

    async def poll() -> None:
        while True:
            result = done()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), timeout_s)
    except asyncio.TimeoutError:
        raise AssertionError(f"not within {timeout_s:g} s: {what}") from None


# -- Ray's actor table ---------------------------------------------------------------------------
async def ray_actors() -> dict[str, dict[str, Any]]:
    """Every actor of the session's Ray by actor id, with its `State`, `JobID` and `Pid`, read
    from the GCS (the state API needs the dashboard, which tests do not start)."""
    from ray._private import state

    return dict(await asyncio.to_thread(state.actors))


async def until_actors_dead(actor_ids: set[str], what: str, timeout_s: float = 60.0) -> None:
    """Until Ray reports every actor in `actor_ids` DEAD."""

    async def dead() -> bool:
        table = await ray_actors()
        return all(table[actor_id]["State"] == "DEAD" for actor_id in actor_ids)

    await until(dead, what, timeout_s)


def process_gone(pid: int) -> bool:
    """No process `pid` on this host any more (or only its zombie, waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True
