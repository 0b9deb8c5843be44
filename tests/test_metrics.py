"""The daemon's Prometheus endpoint, liveness and readiness, scraped over HTTP."""

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from conftest import DaemonFactory
from prometheus_client.parser import text_string_to_metric_families
from raw import RawProducer, task

from broker.ops.metrics import DaemonMetrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def get(port: int, path: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    return await asyncio.to_thread(fetch)


async def scrape(port: int) -> Samples:
    status, text = await get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape_until(
    port: int, ready: Callable[[Samples], bool], timeout_s: float = 30
) -> Samples:
    """Gauges refresh on the daemon's own clock: scrape until they show what is expected."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = await scrape(port)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.2)


async def test_scrape_counts_tasks_by_type_status_and_pool(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    daemon = await start_daemon(metrics_interval_s=0.2)
    port = daemon.metrics_port
    assert port is not None
    assert await get(port, "/readyz") == (200, "ready\n")
    inbox = await producer.inbox()
    for n in range(3):
        await producer.publish("inference", task(args=n), reply_to=inbox.name)
    await producer.publish(
        "training", task("training", "fail", {"message": "no"}), reply_to=inbox.name
    )
    await producer.publish("inference", b"\xc1 not msgpack", reply_to=inbox.name)
    await inbox.wait_for(5)

    # A task is counted once it is settled, just after its reply went out; the gauges refresh
    # on the daemon's own clock.
    samples = await scrape_until(
        port,
        lambda s: (
            value(s, "swarm_pool_actors", pool="cpu") == 1.0
            and sum(v for (name, _), v in s.items() if name == "swarm_tasks_finished_total") == 5
        ),
    )
    assert value(samples, "swarm_tasks_received_total", type="inference") == 4
    assert value(samples, "swarm_tasks_received_total", type="training") == 1
    ok = value(
        samples, "swarm_tasks_finished_total", type="inference", status="ok", code="", pool="cpu"
    )
    assert ok == 3
    assert (
        value(
            samples,
            "swarm_tasks_finished_total",
            type="training",
            status="error",
            code="handler_error",
            pool="cpu",
        )
        == 1
    )
    assert (
        value(
            samples,
            "swarm_tasks_finished_total",
            type="inference",
            status="error",
            code="malformed",
            pool="",
        )
        == 1
    )
    assert value(samples, "swarm_task_run_seconds_count", type="inference", pool="cpu") == 3
    assert value(samples, "swarm_task_queued_seconds_count", type="inference") == 4
    assert value(samples, "swarm_pool_reserved", pool="cpu", resource="cpus") == 1.0
    assert value(samples, "swarm_tasks_in_flight") == 0
    assert value(samples, "swarm_queue_depth", queue="swarm.tasks.inference") == 0
    node_free = [v for (name, _), v in samples.items() if name == "swarm_node_free"]
    assert node_free, "the ledger's free resources per node are exported"
    assert (await get(port, "/healthz"))[0] == 200
    assert (await get(port, "/nope"))[0] == 404


def test_liveness_fails_when_the_event_loop_stalls_and_readiness_follows_the_flag() -> None:
    metrics = DaemonMetrics()
    app = metrics.wsgi_app()
    statuses: list[str] = []

    def call(path: str) -> str:
        body = b"".join(app({"PATH_INFO": path}, lambda status, headers: statuses.append(status)))
        return f"{statuses[-1]} {body.decode().strip()}"

    assert call("/readyz").startswith("503")
    metrics.ready = True
    assert call("/readyz") == "200 OK ready"
    assert call("/healthz").startswith("200 OK")
    metrics.loop_tick_s = time.monotonic() - 60
    assert call("/healthz").startswith("503")
