"""The daemon: wires Ray pools, the ledger, the scheduler and AMQP, and runs until stopped."""

import asyncio
import contextlib
import signal

import structlog

from broker.connection import connect
from broker.control import ControlProcessor
from broker.ingress import Ingress
from broker.ledger import Ledger
from broker.outcomes import OutcomeStore
from broker.pools import PoolSet
from broker.processor import TaskProcessor
from broker.scheduler import Scheduler
from broker.settings import Settings
from workers import cluster
from workers.registry import load_handlers

log = structlog.get_logger("swarm.daemon")

NODE_REFRESH_S = 5.0


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = load_handlers(settings.handler_modules)
        self.scheduler = Scheduler(Ledger())
        self.store = OutcomeStore(
            settings.outcome_retention_s, settings.outcome_memory_mb * 1024 * 1024
        )
        self.pools = PoolSet(
            settings.pool_specs(),
            settings.handler_modules,
            self.scheduler,
            settings.pool_idle_s,
            actor_env=settings.actor_environment(),
        )
        self._ingress: Ingress | None = None
        self._stopped = asyncio.Event()
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect to RabbitMQ (first: it fails fastest), join or start Ray, start the pools,
        then consume. Raises a SwarmError with a one-line explanation when RabbitMQ or Ray is
        not there."""
        amqp_url = self.settings.amqp_url.get_secret_value()
        probe = await connect(amqp_url, name="swarm-daemon-probe")
        await probe.close()
        # In a thread: ray.init blocks for seconds, and off the main thread it leaves our
        # SIGTERM handler in place instead of installing its own.
        await asyncio.to_thread(
            cluster.connect, self.settings.ray_address, num_cpus=self.settings.ray_num_cpus
        )
        await self.pools.start()
        tasks = TaskProcessor(self.settings, self.registry, self.scheduler, self.pools, self.store)
        self.tasks = tasks
        control = ControlProcessor(
            self.settings, self.scheduler, self.pools, self._queue_depths, tasks, self.store
        )
        self._ingress = Ingress(
            amqp_url,
            self.settings.prefetch,
            tasks.process,
            control.process,
            self.store,
            tasks.settled,
            self.settings.max_waiting_per_queue,
        )
        self.scheduler.on_tag_waiting = self._ingress.on_waiting
        tasks.renew = self._ingress.renew
        tasks.publish_progress = self._ingress.publish_progress
        await self._ingress.start()
        self._refresher = asyncio.create_task(self._refresh_nodes())
        log.info("daemon ready", pools=sorted(self.pools.names), handlers=self.registry.names())

    @property
    def ingress(self) -> Ingress | None:
        return self._ingress

    async def _queue_depths(self) -> dict[str, int]:
        return await self._ingress.queue_depths() if self._ingress is not None else {}

    async def _refresh_nodes(self) -> None:
        while True:
            await asyncio.sleep(NODE_REFRESH_S)
            try:
                await self.pools.refresh_nodes()
            except Exception as exc:
                log.warning("could not read the cluster's nodes", error=str(exc))
            self.store.sweep()  # outcomes past the retention window leave memory too

    async def stop(self) -> None:
        """Stop taking work, let in-flight tasks finish within the drain deadline, requeue the
        rest, and release the pools."""
        if self._ingress is not None:
            await self._ingress.stop_consuming()
            requeued = await self._ingress.drain(self.settings.drain_timeout_s)
            log.info("drained", requeued=requeued)
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._ingress is not None:
            await self._ingress.close()
        self.pools.stop()
        self._stopped.set()

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop_requested.set)
        await self.start()
        await stop_requested.wait()
        log.info("stopping")
        await self.stop()
        # Leave Ray cleanly (an embedded Ray is shut down): exiting with the core worker still
        # up ends the process with SIGABRT instead of status 0.
        await asyncio.to_thread(cluster.disconnect)
        log.info("stopped")
