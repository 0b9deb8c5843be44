"""The daemon: wires Ray pools, the ledger, the scheduler and AMQP, and runs until stopped."""

import asyncio
import contextlib
import functools
import signal
import time
from collections.abc import Callable

import structlog

from broker.amqp.connection import connect
from broker.amqp.ingress import Ingress
from broker.amqp.nodes import open_on_a_node
from broker.amqp.outcomes import OutcomeStore
from broker.amqp.publish_stats import PublishCollector
from broker.ops import memory
from broker.ops.control import ControlProcessor
from broker.ops.metrics import ClusterView, DaemonMetrics, MetricsServer
from broker.ops.waiting_age import oldest_waiting
from broker.scheduling.ledger import Ledger
from broker.scheduling.pools import PoolSet
from broker.scheduling.scheduler import Scheduler
from broker.settings import Settings
from broker.tasks.delivery import Delivery
from broker.tasks.outcome import Outcome
from broker.tasks.processor import TaskProcessor
from schemas.topology import DEAD_QUEUE
from workers import cluster
from workers.registry import load_handlers

log = structlog.get_logger("swarm.daemon")

NODE_REFRESH_S = 5.0
BACKGROUND_STOP_S = 5.0


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = load_handlers(settings.handler_modules)
        self.scheduler = Scheduler(Ledger())
        self.store = OutcomeStore(
            settings.outcome_retention_s,
            settings.outcome_memory_mb * 1024 * 1024,
            max_reply_bytes=settings.outcome_max_reply_mb * 1024 * 1024,
        )
        self.pools = PoolSet(
            settings.pool_specs(),
            settings.handler_modules,
            self.scheduler,
            settings.pool_idle_s,
            actor_env=settings.actor_environment(),
            scale_up_timeout_s=settings.scale_up_timeout_s,
            autoscaler_config=settings.autoscaler_config,
        )
        self._ingress: Ingress | None = None
        self.metrics = DaemonMetrics()
        self._metrics_server: MetricsServer | None = None
        self._metrics_refresher: asyncio.Task[None] | None = None
        self._metrics_ticker: asyncio.Task[None] | None = None
        self._on_stop_signal: Callable[[], None] | None = None
        self._stopped = asyncio.Event()
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect to RabbitMQ (first: it fails fastest), join or start Ray, start the pools,
        then consume. Raises a SwarmError with a one-line explanation when RabbitMQ or Ray is
        not there."""
        nodes = self.settings.amqp_nodes()
        if self.settings.return_memory:
            memory.map_large_buffers()  # before the first large body is allocated
        # The node that answers here is the one the ingress tries first.
        probe = await open_on_a_node(nodes, functools.partial(connect, name="swarm-daemon-probe"))
        await probe.close()
        # In a thread: ray.init blocks for seconds, and off the main thread it leaves our
        # SIGTERM handler in place instead of installing its own.
        # Served from the start: /healthz answers (and /readyz says "not ready") while Ray
        # and the pools come up, which can take a while on a cluster.
        self._start_metrics_server()
        self._metrics_ticker = asyncio.create_task(self._tick_liveness())
        joining = asyncio.ensure_future(
            asyncio.to_thread(
                cluster.connect, self.settings.ray_address, num_cpus=self.settings.ray_num_cpus
            )
        )
        try:
            await asyncio.shield(joining)
        except asyncio.CancelledError:
            # ray.init cannot be interrupted: let it finish (seconds) so that the stop that
            # follows leaves Ray with nothing half started.
            with contextlib.suppress(Exception):
                await joining
            raise
        self._handle_stop_signals()
        await self.pools.start()
        tasks = TaskProcessor(self.settings, self.registry, self.scheduler, self.pools, self.store)
        self.tasks = tasks
        control = ControlProcessor(
            self.settings,
            self.scheduler,
            self.pools,
            self._queue_depths,
            tasks,
            self.store,
            amqp_nodes=nodes.describe,
        )
        metrics = self.metrics

        async def process_task(delivery: Delivery) -> Outcome:
            metrics.task_received(delivery.task_type)
            return await tasks.process(delivery)

        def settled(outcome: Outcome) -> None:
            tasks.settled(outcome)
            metrics.task_finished(outcome)

        self._ingress = Ingress(
            nodes,
            self.settings.prefetch,
            process_task,
            control.process,
            self.store,
            settled,
            self.settings.max_waiting_per_queue,
            self.settings.max_held_mb * 1024 * 1024,
            self.settings.return_memory,
            self.settings.refused_reply_retry_s,
        )
        self.metrics.watch_held(self._ingress.held)
        self.metrics.registry.register(PublishCollector(self._ingress.publish_stats))
        self.scheduler.on_tag_waiting = self._ingress.on_waiting
        tasks.renew = self._ingress.renew
        tasks.publish_progress = self._ingress.publish_progress
        await self._ingress.start()
        self._refresher = asyncio.create_task(self._refresh_nodes())
        self._metrics_refresher = asyncio.create_task(
            metrics.refresh_forever(self._cluster_view, self.settings.metrics_interval_s)
        )
        self.metrics.ready = True
        log.info(
            "daemon_ready",
            pools=sorted(self.pools.names),
            handlers=self.registry.names(),
            metrics_port=self.metrics_port,
            amqp_node=self._ingress.node,
        )

    def _handle_stop_signals(self) -> None:
        """SIGTERM and SIGINT to `serve`'s stop. Again once Ray is joined: joining installs
        Ray's native failure-signal handler for SIGTERM over ours, and a SIGTERM that reached
        it logged a stack and aborted the process (exit -6) or left it running, instead of
        draining and exiting 0."""
        if self._on_stop_signal is None:
            return  # started by a caller that handles signals itself (tests, embedding)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal)

    def _start_metrics_server(self) -> None:
        port = self.settings.metrics_port
        if port < 0:
            return
        try:
            self._metrics_server = MetricsServer(self.metrics, self.settings.metrics_host, port)
        except OSError as exc:
            # Not fatal: a second daemon on the same host (a standby) must still serve.
            log.error("metrics_endpoint_not_started", port=port, error=str(exc))
            log.debug("metrics_endpoint_not_started_traceback", exc_info=True)

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics, /healthz and /readyz answer on (None: not served)."""
        return self._metrics_server.port if self._metrics_server is not None else None

    async def _cluster_view(self) -> ClusterView:
        ingress = self._ingress
        self.metrics.ready = ingress is not None and ingress.consuming
        pools = {}
        for name in sorted(self.pools.names):
            view = self.scheduler.ledger.pool_view(name)
            view["waiting"] = self.scheduler.waiting(name)
            view["scale_up_actors"] = self.pools.scale_up(name)
            pools[name] = view
        nodes = [self.scheduler.ledger.node_view(n) for n in self.scheduler.ledger.alive_nodes()]
        queues = await self._queue_depths()
        task_queues = [name for name in queues if name != DEAD_QUEUE]
        consumers = ingress.depth_reader.consumers if ingress is not None else {}
        return ClusterView(
            pools=pools,
            nodes=nodes,
            queues=queues,
            in_flight=self.tasks.active.count,
            consumers={name: consumers[name] for name in task_queues if name in consumers},
            # After the await: the waiters as they are now.
            oldest_waiting=oldest_waiting(self.scheduler.waiting_origins(), task_queues),
        )

    @property
    def ingress(self) -> Ingress | None:
        return self._ingress

    async def _queue_depths(self) -> dict[str, int]:
        return await self._ingress.queue_depths() if self._ingress is not None else {}

    async def _tick_liveness(self) -> None:
        """Until the refresher takes over: /healthz tells a stuck event loop from a slow
        start."""
        while self._metrics_refresher is None:
            self.metrics.loop_tick_s = time.monotonic()
            await asyncio.sleep(1.0)

    async def _refresh_nodes(self) -> None:
        while True:
            await asyncio.sleep(NODE_REFRESH_S)
            try:
                await self.pools.refresh_nodes()
            except Exception as exc:
                log.warning("node_refresh_failed", error=str(exc))
                log.debug("node_refresh_failed_traceback", exc_info=True)
            self.store.sweep()  # outcomes past the retention window leave memory too

    async def stop(self) -> None:
        """Stop taking work, let in-flight tasks finish within the drain deadline, requeue the
        rest, and release the pools."""
        self.metrics.ready = False
        # First, and with a bound: a refresh cancelled inside a channel's open or close (the
        # queue depths) left aio-pika waiting on a frame that never came, and the stop hung.
        background = [
            task
            for task in (self._refresher, self._metrics_refresher, self._metrics_ticker)
            if task is not None
        ]
        for task in background:
            task.cancel()
        if background:
            _, stuck = await asyncio.wait(background, timeout=BACKGROUND_STOP_S)
            if stuck:
                log.warning("background_tasks_not_stopped", tasks=len(stuck))
        if self._ingress is not None:
            await self._ingress.stop_consuming()
            requeued = await self._ingress.drain(self.settings.drain_timeout_s)
            log.info("drained", requeued=requeued)
        if self._ingress is not None:
            await self._ingress.close()
        self.pools.stop()
        if self._metrics_server is not None:
            self._metrics_server.close()
        self._stopped.set()

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        stop_requested = asyncio.Event()
        self._on_stop_signal = stop_requested.set
        self._handle_stop_signals()  # a SIGTERM while Ray starts (seconds) stops us too
        log.info("daemon_starting", amqp_nodes=self.settings.amqp_nodes().describe()["nodes"])
        starting = asyncio.ensure_future(self.start())
        stopping = asyncio.ensure_future(stop_requested.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            stopping.cancel()
            starting.result()  # a start that failed raises its one-line error here
            await stop_requested.wait()
            log.info("stopping")
        else:
            # SIGTERM or Ctrl-C during start-up (Ray joining, actors starting, a RabbitMQ
            # node not answering): stop there rather than after a start that can take a
            # minute. Nothing was consumed yet.
            log.info("stopping_during_start")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        await self.stop()
        # Leave Ray cleanly (an embedded Ray is shut down): exiting with the core worker still
        # up ends the process with SIGABRT instead of status 0.
        await asyncio.to_thread(cluster.disconnect)
        log.info("stopped")
