"""Control requests on `swarm.control`: `status` (ledger, pools, queues, limits, the RabbitMQ
node), `cancel`, and `task` (what this daemon knows of one task id)."""

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from broker.amqp.outcomes import OutcomeStore
from broker.ops.shared_read import SharedRead
from broker.scheduling.ledger import Ledger
from broker.scheduling.pools import PoolSet
from broker.scheduling.scheduler import Scheduler
from broker.settings import Settings
from broker.tasks.delivery import Delivery
from broker.tasks.intake import describe_validation
from broker.tasks.outcome import Outcome
from broker.tasks.processor import TaskProcessor
from broker.tasks.replies import encode_reply, error_reply
from schemas.codec import CodecLimits, DecodeError, decode
from schemas.control import CancelRequest, TaskRequest, parse_control
from schemas.reply import Reply
from schemas.topology import CONTENT_TYPE, CONTROL_ROUTING_TYPE

ROUTING_TYPE = CONTROL_ROUTING_TYPE
# A stored reply larger than this is described, not sent back, in a `task` answer: the answer
# must stay readable by any client's default decoding limits.
TASK_REPLY_MAX_BYTES = 1024 * 1024


class ControlProcessor:
    def __init__(
        self,
        settings: Settings,
        scheduler: Scheduler,
        pools: PoolSet,
        queue_depths: Callable[[], Awaitable[dict[str, int]]],
        tasks: TaskProcessor,
        store: OutcomeStore,
        *,
        amqp_nodes: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        self._tasks = tasks
        # The RabbitMQ node the daemon is connected to, and every node it may use.
        self._amqp_nodes = amqp_nodes
        self._store = store
        self._settings = settings
        self._scheduler = scheduler
        self._ledger: Ledger = scheduler.ledger
        self._pools = pools
        self._queue_depths = queue_depths
        # A burst of status requests (up to the control consumer's prefetch at once) builds
        # one answer at a time, shared by all who asked while the previous one was built.
        self._shared_status = SharedRead(self._read_status)

    async def process(self, delivery: Delivery) -> Outcome:
        if delivery.properties_error is not None:
            # Never act on a request read in part (broker/amqp/frames.py salvaged what it could).
            return self._invalid(
                f"AMQP properties could not be decoded: {delivery.properties_error}"
            )
        if delivery.content_type != CONTENT_TYPE:
            return self._invalid(f"content_type must be {CONTENT_TYPE!r}")
        try:
            request = parse_control(decode(delivery.body, self._settings.codec_limits))
        except DecodeError as exc:
            return self._invalid(f"not a msgpack control request: {exc}")
        except ValidationError as exc:
            return self._invalid(describe_validation(exc))
        if isinstance(request, CancelRequest):
            return self._ok(await self.cancel(request.id))
        if isinstance(request, TaskRequest):
            return self._ok(self.task(request.id))
        return self._ok(await self.status())

    async def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel by id. `state` says which case it was: `finished` (too late: its outcome is
        stored), `waiting` or `running` (it will be answered `cancelled`), `finishing` (its
        outcome is being published), or `unseen` (remembered: answered `cancelled` on
        arrival within the retention window)."""
        stored = self._store.get(task_id)
        if stored is not None:
            return {"id": task_id, "state": "finished", "status": stored.status}
        state = self._tasks.active.cancel(task_id)
        if state is None:
            await self._store.remember_cancel(task_id)
            return {"id": task_id, "state": "unseen", "remembered_s": self._store.retention_s}
        return {"id": task_id, "state": state}

    def task(self, task_id: str) -> dict[str, Any]:
        """What this daemon knows of one task. `state`: `done` (its outcome is stored: `status`,
        `recorded_at_s` and `reply`, the stored reply decoded; over TASK_REPLY_MAX_BYTES only
        its size, `reply_bytes`), `waiting` (admitted, waiting for room), `running`,
        `finishing` (its outcome is being published), or `unknown` (not seen here, or its
        outcome is past the retention window; `cancel_remembered` when a cancel waits for
        it)."""
        stored = self._store.get(task_id)
        if stored is not None:
            answer: dict[str, Any] = {
                "id": task_id,
                "state": "done",
                "status": stored.status,
                "recorded_at_s": stored.recorded_at_s,
                "reply_bytes": len(stored.reply_body),
            }
            if len(stored.reply_body) <= TASK_REPLY_MAX_BYTES:
                limits = CodecLimits(
                    max_body_bytes=TASK_REPLY_MAX_BYTES,
                    max_depth=self._settings.max_depth + 2,  # the reply's own map around it
                    max_containers=self._settings.max_containers + 2,
                )
                try:
                    answer["reply"] = decode(stored.reply_body, limits)
                except DecodeError as exc:
                    answer["reply_error"] = f"the stored reply could not be decoded: {exc}"
            return answer
        active = self._tasks.active.get(task_id)
        if active is not None:
            if active.worker is None:
                state = "finishing"
            else:
                state = "running" if active.running else "waiting"
            return {"id": task_id, "state": state, "attempts": active.attempts}
        return {
            "id": task_id,
            "state": "unknown",
            "cancel_remembered": self._store.cancel_pending(task_id),
            "retention_s": self._store.retention_s,
        }

    async def status(self) -> dict[str, Any]:
        """Pools, nodes, queue depths and limits, read after the request arrived."""
        return await self._shared_status()

    async def _read_status(self) -> dict[str, Any]:
        await self._pools.refresh_nodes()
        pools = {}
        for name in sorted(self._pools.names):
            view = self._ledger.pool_view(name)
            spec = self._pools.spec(name)
            view.update(
                {
                    "shape": spec.shape.as_dict(),
                    "min_actors": spec.min_size,
                    "max_actors": spec.max_size,
                    "waiting": self._scheduler.waiting(name),
                    "scale_up_actors": self._pools.scale_up(name),
                }
            )
            pools[name] = view
        answer: dict[str, Any] = {
            "pools": pools,
            "nodes": [self._ledger.node_view(node) for node in self._ledger.nodes.values()],
            "queues": await self._queue_depths(),
            "limits": {
                "max_body_bytes": self._settings.max_body_bytes,
                "max_depth": self._settings.max_depth,
                "max_containers": self._settings.max_containers,
                "prefetch": self._settings.prefetch,
                "default_max_retries": self._settings.default_max_retries,
            },
        }
        if self._amqp_nodes is not None:
            answer["rabbitmq"] = self._amqp_nodes()
        return answer

    def _ok(self, result: Any) -> Outcome:
        body = encode_reply(Reply(id=None, status="ok", result=result))
        return Outcome(None, "ok", body, ROUTING_TYPE)

    def _invalid(self, message: str) -> Outcome:
        reply = error_reply(None, "error", "invalid", message)
        # Control requests are answered, not dead-lettered: they are not tasks.
        return Outcome(
            None,
            "error",
            encode_reply(reply),
            ROUTING_TYPE,
            "invalid",
            message,
            dead_letter_errors=False,
        )
