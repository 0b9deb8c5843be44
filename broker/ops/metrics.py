"""Prometheus metrics of the daemon, and its liveness and readiness endpoints.

Per-task metrics are counted on the event loop as tasks arrive and finish (a few
microseconds each). The slow-changing ones (the ledger, the pools, the queue depths) are
refreshed by a loop task every `interval_s` and only read by the HTTP thread, which so never
touches the daemon's live structures.
"""

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from broker.tasks.held import HeldBytes
from broker.tasks.outcome import Outcome
from schemas.topology import TASK_TYPES

log = structlog.get_logger("swarm.metrics")

# Seconds: a task's time waiting (queue and scheduler) and running, from 1 ms to 1 h.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600)
RESOURCES = ("cpus", "gpus", "memory_mb")
# The event loop must tick within this long for /healthz to answer 200.
LIVENESS_STALL_S = 15.0


@dataclass(frozen=True)
class ClusterView:
    """What the refresher reads on the event loop: the ledger's and pools' views (plain data,
    as the status op builds them), the queues' depths, the task queues' consumers, and the
    age in seconds of the oldest task waiting per task queue (broker/ops/waiting_age.py)."""

    pools: dict[str, dict[str, Any]]
    nodes: list[dict[str, Any]]
    queues: dict[str, int]
    in_flight: int
    consumers: dict[str, int] = field(default_factory=dict)
    oldest_waiting: dict[str, float] = field(default_factory=dict)


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "swarm_tasks_received", "Task messages received, by queue type", ["type"], registry=r
        )
        self.finished = Counter(
            "swarm_tasks_finished",
            "Tasks answered, by type, final status, error code ('' when ok) and pool",
            ["type", "status", "code", "pool"],
            registry=r,
        )
        self.queued = Histogram(
            "swarm_task_queued_seconds",
            "Time from arrival to the start of the run (or the answer, when never run)",
            ["type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.run = Histogram(
            "swarm_task_run_seconds",
            "Run time of tasks that ran, by type and pool",
            ["type", "pool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "swarm_tasks_in_flight", "Tasks received and not yet answered", registry=r
        )
        self.pool_actors = Gauge("swarm_pool_actors", "Actors per pool", ["pool"], registry=r)
        self.pool_running = Gauge(
            "swarm_pool_running", "Tasks running per pool", ["pool"], registry=r
        )
        self.pool_waiting = Gauge(
            "swarm_pool_waiting", "Tasks waiting for room per pool", ["pool"], registry=r
        )
        self.pool_scale_up = Gauge(
            "swarm_pool_scale_up_actors",
            "Actors per pool the cluster's autoscaler is asked to make room for (pending)",
            ["pool"],
            registry=r,
        )
        self.pool_reserved = Gauge(
            "swarm_pool_reserved",
            "Resources a pool's actors reserve",
            ["pool", "resource"],
            registry=r,
        )
        self.pool_free = Gauge(
            "swarm_pool_free",
            "Resources of a pool's actors not used by tasks",
            ["pool", "resource"],
            registry=r,
        )
        self.node_reserved = Gauge(
            "swarm_node_reserved",
            "Resources Swarm's actors reserve on a node",
            ["node", "resource"],
            registry=r,
        )
        self.node_free = Gauge(
            "swarm_node_free",
            "Resources of a node not reserved by Swarm",
            ["node", "resource"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "swarm_queue_depth", "Messages ready in a queue", ["queue"], registry=r
        )
        self.queue_consumers = Gauge(
            "swarm_queue_consumers",
            "Consumers of a task queue, every daemon's (as RabbitMQ counts them)",
            ["queue"],
            registry=r,
        )
        self.oldest_waiting = Gauge(
            "swarm_queue_oldest_waiting_seconds",
            "Age of the oldest task of a queue the daemon holds and has not started (0: none)",
            ["queue"],
            registry=r,
        )
        self.ready_gauge = Gauge(
            "swarm_ready", "1 while /readyz answers 200 (consuming), else 0", registry=r
        )
        self.ready_gauge.set_function(lambda: 1.0 if self.ready else 0.0)
        self.held_bytes = Gauge(
            "swarm_held_bytes", "Body bytes of deliveries held unsettled", registry=r
        )
        self.held_bytes_peak = Gauge(
            "swarm_held_bytes_peak",
            "Most body bytes held unsettled at once since start",
            registry=r,
        )
        self.held_bytes_limit = Gauge(
            "swarm_held_bytes_limit",
            "Held body bytes at which the task consumers pause (SWARM_MAX_HELD_MB)",
            registry=r,
        )
        self.ready = False
        self.loop_tick_s = time.monotonic()
        # Nodes with series now: a node that leaves the cluster has its series removed, or
        # every node ever seen (autoscaled, replaced) would be scraped forever.
        self._nodes: set[str] = set()

    def watch_held(self, held: HeldBytes) -> None:
        """Read at scrape time: two integer attributes, safe to read from the HTTP thread and
        exact at any instant, where a refreshed copy would miss a short peak."""
        self.held_bytes.set_function(lambda: held.held)
        self.held_bytes_peak.set_function(lambda: held.peak)
        self.held_bytes_limit.set(held.limit_bytes)

    # -- per task, on the event loop ---------------------------------------------------------
    def task_received(self, task_type: str | None) -> None:
        self.received.labels(task_type or "unknown").inc()

    def task_finished(self, outcome: Outcome) -> None:
        if outcome.routing_type not in TASK_TYPES or (not outcome.reply and not outcome.record):
            return  # control answers; a redelivery settled silently is not a new answer
        pool = outcome.pool or ""
        self.finished.labels(
            outcome.routing_type, outcome.status, outcome.error_code or "", pool
        ).inc()
        self.queued.labels(outcome.routing_type).observe(outcome.queued_ms / 1000.0)
        if outcome.pool:
            self.run.labels(outcome.routing_type, pool).observe(outcome.run_ms / 1000.0)

    # -- refreshed from the event loop -------------------------------------------------------
    def update(self, view: ClusterView) -> None:
        self.in_flight.set(view.in_flight)
        for name, pool in view.pools.items():
            self.pool_actors.labels(name).set(pool["actors"])
            self.pool_running.labels(name).set(pool["running"])
            self.pool_waiting.labels(name).set(pool["waiting"])
            self.pool_scale_up.labels(name).set(pool.get("scale_up_actors", 0))
            for resource in RESOURCES:
                self.pool_reserved.labels(name, resource).set(pool["reserved"][resource])
                self.pool_free.labels(name, resource).set(pool["free"][resource])
        nodes: set[str] = set()
        for node in view.nodes:
            node_id = str(node["node_id"])[:12]
            nodes.add(node_id)
            for resource in RESOURCES:
                self.node_reserved.labels(node_id, resource).set(node["reserved"][resource])
                self.node_free.labels(node_id, resource).set(node["free"][resource])
        for gone in self._nodes - nodes:
            for resource in RESOURCES:
                for gauge in (self.node_reserved, self.node_free):
                    with contextlib.suppress(KeyError):
                        gauge.remove(gone, resource)
        self._nodes = nodes
        for queue, depth in view.queues.items():
            self.queue_depth.labels(queue).set(depth)
        for queue, count in view.consumers.items():
            self.queue_consumers.labels(queue).set(count)
        for queue, age_s in view.oldest_waiting.items():
            self.oldest_waiting.labels(queue).set(age_s)

    async def refresh_forever(
        self, read: Callable[[], Awaitable[ClusterView]], interval_s: float
    ) -> None:
        """Tick the liveness clock every second and refresh the gauges every `interval_s`."""
        next_refresh = 0.0
        while True:
            self.loop_tick_s = time.monotonic()
            if self.loop_tick_s >= next_refresh:
                next_refresh = self.loop_tick_s + interval_s
                try:
                    self.update(await read())
                except Exception as exc:  # a failed refresh leaves the last values
                    log.warning("metrics_refresh_failed", error=str(exc))
                    log.debug("metrics_refresh_failed_traceback", exc_info=True)
            await asyncio.sleep(min(1.0, interval_s))

    # -- HTTP, in a thread ---------------------------------------------------------------------
    def wsgi_app(self) -> Callable[..., Iterable[bytes]]:
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                stalled_s = time.monotonic() - self.loop_tick_s
                alive = stalled_s < LIVENESS_STALL_S
                return _text(start_response, alive, f"event loop ticked {stalled_s:.1f} s ago")
            if path == "/readyz":
                return _text(start_response, self.ready, "ready" if self.ready else "not ready")
            if path in ("/metrics", "/"):
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"try /metrics, /healthz or /readyz\n"]

        return app


def _text(start_response: Callable[..., Any], ok: bool, message: str) -> list[bytes]:
    start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
    return [message.encode() + b"\n"]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """/metrics, /healthz and /readyz on `host:port` (port 0: any free port), in a thread."""

    def __init__(self, metrics: DaemonMetrics, host: str, port: int) -> None:
        self._server = make_server(
            host, port, metrics.wsgi_app(), _ThreadingServer, handler_class=_QuietHandler
        )
        self.port: int = self._server.server_port
        self._thread = Thread(target=self._serve, name="swarm-metrics", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        # SIGTERM and SIGINT are the daemon's to handle, on its main thread: delivered to
        # this thread instead, they met Ray's native signal handler there, which aborted the
        # process (exit -6) instead of letting the daemon drain. Request threads inherit this.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        self._server.serve_forever()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._server.shutdown()
            self._server.server_close()
