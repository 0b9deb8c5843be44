"""Memory: no growth per status request, held bodies bounded by bytes, memory returned after
a burst of large tasks.

The status burst and the large tasks run against the daemon as a process of its own
(`swarm run`), so its RSS is the daemon's alone: in-process, the producer's buffers and the
replies this test receives would be counted too. The depth reads, a pure in-daemon path,
run in-process and read the reader's own counters.
"""

import asyncio
import collections
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import aio_pika
import msgpack
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from conftest import DaemonFactory
from daemon_process import DaemonProcess
from hardening import Figures, peak_rss_mb, rss_mb
from raw import RawProducer, task

from broker.amqp.ingress import Ingress
from broker.ops.shared_read import SharedRead
from schemas.topology import (
    CONTROL_QUEUE,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    DEAD_QUEUE_ARGUMENTS,
    TASK_TYPES,
    task_queue,
)

MB = 1024 * 1024
STATUS_BURST = 10_000
STATUS_WARM_UP = 1_000
# Growth allowed per status request: a channel per request cost 3.6-4 KB (36-40 MB per
# 10,000); what remains is allocator noise: 1-3 MB per burst measured.
STATUS_GROWTH_KB_PER_REQUEST = 1.0
DEPTH_READS = 10_000
LARGE_TASKS = 200
LARGE_ARGS_BYTES = 4 * MB
LARGE_TASK_S = 0.25
HELD_LIMIT_MB = 64
PREFETCH = 32
# After the burst, once idle, the daemon's private memory must be back within this of its
# value before it. The outcome index keeps up to SWARM_OUTCOME_MEMORY_MB of replies on purpose
# (16 here). Private: RSS less the pages of Ray's object store (a shared mapping of /dev/shm
# that every Ray process touching large objects has resident; it belongs to the node's store,
# bounded by its capacity, reused for later objects, and is not the daemon's to return).
IDLE_BUDGET_MB = 150


class ReplyCounter:
    """Consumes a reply queue keeping only each reply's correlation id and status header:
    200 replies of 4 MB kept whole would be 800 MB in the test process."""

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel
        self.by_correlation: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Condition()

    async def start(self) -> "ReplyCounter":
        queue = await self._channel.declare_queue("", exclusive=True, auto_delete=True)
        self.name = queue.name
        await queue.consume(self._on_message, no_ack=True)
        return self

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        async with self._changed:
            self.by_correlation[str(message.correlation_id)] += 1
            self.statuses[str((message.headers or {}).get("x-swarm-status"))] += 1
            self._changed.notify_all()

    @property
    def total(self) -> int:
        return sum(self.by_correlation.values())

    async def wait_for(self, count: int, timeout_s: float) -> None:
        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self.total >= count)

        await asyncio.wait_for(until(), timeout_s)

    def figures(self, case: str, sent_ids: list[str], **extra: object) -> Figures:
        answered = sum(1 for cid in sent_ids if self.by_correlation[cid] > 0)
        duplicated = sum(max(0, self.by_correlation[cid] - 1) for cid in sent_ids)
        return Figures(
            case=case,
            sent=len(sent_ids),
            answered=answered,
            lost=len(sent_ids) - answered,
            duplicated=duplicated,
            **extra,  # type: ignore[arg-type]
        )


async def _publish_all(
    channel: AbstractChannel,
    routing_key: str,
    messages: list[bytes],
    reply_to: str,
    ids: list[str],
    exchange: str = "",
) -> None:
    """Publish with confirms, a window at a time (10,000 one by one take seconds)."""
    target = channel.default_exchange if not exchange else await channel.get_exchange(exchange)
    window = 500
    for start in range(0, len(messages), window):
        await asyncio.gather(
            *(
                target.publish(
                    aio_pika.Message(
                        body,
                        content_type="application/msgpack",
                        correlation_id=cid,
                        reply_to=reply_to,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key,
                )
                for body, cid in zip(
                    messages[start : start + window], ids[start : start + window], strict=True
                )
            )
        )


def private_rss_mb(pid: int) -> float:
    """RSS less shared memory (RssAnon + RssFile), from /proc/<pid>/status."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value
    return sum(int(fields[name].split()[0]) for name in ("RssAnon", "RssFile")) / 1024.0


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, ""


async def _metric(port: int, name: str) -> float:
    _, text = await asyncio.to_thread(_http, port, "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise LookupError(name)


async def _ready(port: int) -> bool:
    status, _ = await asyncio.to_thread(_http, port, "/readyz")
    return status == 200


def _metrics_port(daemon: DaemonProcess) -> int:
    ready = next(entry for entry in daemon.log if entry.get("event") == "daemon_ready")
    return int(ready["metrics_port"])


async def _status_wave(
    producer: RawProducer, replies: ReplyCounter, count: int, prefix: str
) -> list[str]:
    ids = [f"{prefix}-{n}" for n in range(count)]
    body = msgpack.packb({"v": 1, "op": "status"})
    await _publish_all(producer.channel, "swarm.control", [body] * count, replies.name, ids)
    return ids


async def test_a_burst_of_status_requests_leaves_no_memory_behind(
    amqp_url: str, ray_address: str, producer: RawProducer
) -> None:
    daemon = await DaemonProcess(amqp_url, ray_address).start()
    try:
        assert daemon.process is not None
        pid = daemon.process.pid
        replies = await ReplyCounter(producer.channel).start()
        await _status_wave(producer, replies, STATUS_WARM_UP, "warm")
        await replies.wait_for(STATUS_WARM_UP, timeout_s=120)
        before_mb = rss_mb(pid)

        ids = await _status_wave(producer, replies, STATUS_BURST, "burst")
        await replies.wait_for(STATUS_WARM_UP + STATUS_BURST, timeout_s=300)
        after_mb = rss_mb(pid)
        growth_kb = (after_mb - before_mb) * 1024 / STATUS_BURST
        print(
            f"memory status burst={STATUS_BURST} rss_before_mb={before_mb:.1f} "
            f"rss_after_mb={after_mb:.1f} growth_mb={after_mb - before_mb:.1f} "
            f"growth_kb_per_request={growth_kb:.3f}"
        )
        figures = replies.figures(
            "status-burst-10000",
            ids,
            peak_rss_mb=peak_rss_mb(pid),
            ready=await _ready(_metrics_port(daemon)),
        )
        figures.check()
        assert replies.statuses["ok"] == STATUS_WARM_UP + STATUS_BURST, replies.statuses
        assert growth_kb < STATUS_GROWTH_KB_PER_REQUEST
    finally:
        daemon.terminate()
        assert await daemon.wait() == 0


async def test_depth_reads_share_one_channel_and_one_read(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    daemon = await start_daemon()
    ingress = daemon.ingress
    assert ingress is not None
    reader = ingress.depth_reader
    await ingress.queue_depths()
    reads_before = reader.reads

    # 10,000 at once (a status storm, the metrics refresh among them): one read, maybe two.
    answers = await asyncio.gather(*(ingress.queue_depths() for _ in range(DEPTH_READS)))
    assert all(answer == answers[0] for answer in answers)
    assert reader.reads - reads_before <= 2
    assert reader.channels_opened == 1

    # 10,000 one after another, as the metrics refresh calls it: still one channel.
    before_mb = rss_mb()
    for _ in range(DEPTH_READS):
        await ingress.queue_depths()
    after_mb = rss_mb()
    print(
        f"memory depth reads={DEPTH_READS} sequential rss_before_mb={before_mb:.1f} "
        f"rss_after_mb={after_mb:.1f} channels_opened={reader.channels_opened}"
    )
    assert reader.channels_opened == 1
    assert after_mb - before_mb < DEPTH_READS * STATUS_GROWTH_KB_PER_REQUEST / 1024

    # A 404 closes the channel (the dead-letter queue deleted under the daemon): the read
    # fails, and the next one, once the queue is back, opens a fresh channel.
    await producer.channel.queue_delete(DEAD_QUEUE)
    try:
        await ingress.queue_depths()
        raise AssertionError("a read of a deleted queue answered")
    except aio_pika.exceptions.ChannelNotFoundEntity:
        pass
    dead = await producer.channel.declare_queue(
        DEAD_QUEUE, durable=True, arguments=DEAD_QUEUE_ARGUMENTS
    )
    await dead.bind(DEAD_EXCHANGE)
    assert (await ingress.queue_depths())[DEAD_QUEUE] == 0
    assert reader.channels_opened == 2
    Figures(
        case="depth-reads-10000-at-once",
        sent=DEPTH_READS,
        answered=len(answers),
        lost=DEPTH_READS - len(answers),
        peak_rss_mb=peak_rss_mb(),
        ready=ingress.consuming,
    ).check()


async def _trimmed_after(daemon: DaemonProcess, released_bytes: int, timeout_s: float) -> None:
    """Wait for the trim that follows the last release: the daemon logs the bytes it has
    released in total, so the one naming every byte sent is the last."""

    def seen() -> bool:
        return any(
            entry.get("event") == "heaps_trimmed"
            and entry.get("released_bytes_total") == released_bytes
            for entry in daemon.log
        )

    async def wait() -> None:
        async with daemon._logged:
            await daemon._logged.wait_for(seen)

    await asyncio.wait_for(wait(), timeout_s)


async def test_large_tasks_are_held_by_bytes_and_their_memory_returned(
    amqp_url: str, ray_address: str, producer: RawProducer
) -> None:
    daemon = await DaemonProcess(
        amqp_url,
        ray_address,
        max_held_mb=HELD_LIMIT_MB,
        prefetch=PREFETCH,
        outcome_memory_mb=16,
    ).start()
    try:
        assert daemon.process is not None
        pid = daemon.process.pid
        port = _metrics_port(daemon)
        replies = await ReplyCounter(producer.channel).start()

        warm_ids = [f"warm-{n}" for n in range(20)]
        warm = [msgpack.packb(task(id=cid, args={"n": 1})) for cid in warm_ids]
        await _publish_all(
            producer.channel, "inference", warm, replies.name, warm_ids, exchange="swarm.tasks"
        )
        await replies.wait_for(len(warm_ids), timeout_s=120)
        start_mb, start_private_mb = rss_mb(pid), private_rss_mb(pid)

        ids = [f"large-{n}-{uuid.uuid4().hex[:6]}" for n in range(LARGE_TASKS)]
        payload = bytes(LARGE_ARGS_BYTES)
        # Each run takes a while, so deliveries pile up past the held-bytes limit whatever
        # the speed of the daemon's own path (an instant echo could settle them as fast as
        # the producer publishes, and the limit would never be reached).
        large_args = {"seconds": LARGE_TASK_S, "data": payload}
        bodies = [msgpack.packb(task(id=cid, handler="sleep", args=large_args)) for cid in ids]
        for start in range(0, LARGE_TASKS, 10):  # 40 MB a window: the test's own memory
            await _publish_all(
                producer.channel,
                "inference",
                bodies[start : start + 10],
                replies.name,
                ids[start : start + 10],
                exchange="swarm.tasks",
            )
        released = sum(map(len, warm)) + sum(map(len, bodies))
        del bodies
        await replies.wait_for(len(warm_ids) + LARGE_TASKS, timeout_s=300)
        await _trimmed_after(daemon, released, timeout_s=60)
        idle_mb, idle_private_mb = rss_mb(pid), private_rss_mb(pid)
        peak_mb = peak_rss_mb(pid)
        held_peak = await _metric(port, "swarm_held_bytes_peak")
        held_now = await _metric(port, "swarm_held_bytes")
        print(
            f"memory large tasks={LARGE_TASKS}x{LARGE_ARGS_BYTES // MB}MB "
            f"rss_start_mb={start_mb:.0f} rss_peak_mb={peak_mb:.0f} rss_idle_mb={idle_mb:.0f} "
            f"private_start_mb={start_private_mb:.0f} private_idle_mb={idle_private_mb:.0f} "
            f"held_peak_mb={held_peak / MB:.1f} held_limit_mb={HELD_LIMIT_MB} "
            f"prefetch={PREFETCH} paused={_count(daemon, 'task_consumers_paused')}"
        )
        replies.figures(
            "large-tasks-200x4MB", ids, peak_rss_mb=peak_mb, ready=await _ready(port)
        ).check()
        assert replies.statuses["ok"] == len(warm_ids) + LARGE_TASKS, replies.statuses
        assert held_now == 0
        # The bound: the limit, plus what RabbitMQ had sent before the pause took effect (at
        # most one prefetch window of the one task queue in use).
        body_bytes = len(msgpack.packb(task(id=ids[0], handler="sleep", args=large_args)))
        assert held_peak <= HELD_LIMIT_MB * MB + PREFETCH * body_bytes
        assert _count(daemon, "task_consumers_paused") >= 1
        assert idle_private_mb <= start_private_mb + IDLE_BUDGET_MB
    finally:
        daemon.terminate()
        assert await daemon.wait() == 0


def _count(daemon: DaemonProcess, event: str) -> int:
    return sum(1 for entry in daemon.log if entry.get("event") == event)


async def _until_consumers(ingress: Ingress, wanted: Callable[[], bool]) -> None:
    async def until() -> None:
        async with ingress.consumers_changed:
            await ingress.consumers_changed.wait_for(wanted)

    await asyncio.wait_for(until(), 60)
    await ingress.consumers_settled()


async def test_held_bytes_pause_task_queues_only_and_combine_with_backpressure(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    """One body over SWARM_MAX_HELD_MB pauses every task consumer, never the control one; a
    queue also paused by the scheduler's backpressure resumes only once both reasons ended."""
    daemon = await start_daemon(handler_modules=["workers.diagnostics"], max_held_mb=1)
    ingress = daemon.ingress
    assert ingress is not None
    queues = [task_queue(task_type) for task_type in TASK_TYPES]
    backlogged = task_queue("inference")
    inbox = await producer.inbox()
    gate = tmp_path / "open"

    blocker = task("training", "wait_file", {"path": str(gate), "pad": bytes(2 * MB)})
    await producer.publish("training", blocker, reply_to=inbox.name)
    await _until_consumers(ingress, lambda: all(ingress.is_paused(q) for q in queues))
    assert ingress.held.over and not ingress.is_paused(CONTROL_QUEUE)

    # Control is still consumed: a status request is answered while the tasks are paused.
    await producer.channel.default_exchange.publish(
        aio_pika.Message(
            msgpack.packb({"v": 1, "op": "status"}),
            content_type="application/msgpack",
            reply_to=inbox.name,
        ),
        CONTROL_QUEUE,
    )
    status = await inbox.one()
    assert status.payload["status"] == "ok"
    assert status.payload["result"]["queues"][task_queue("training")] == 0

    # The scheduler reports a backlog on one queue, then the large body is settled.
    ingress.on_waiting(backlogged, 10_000)
    gate.touch()
    others = [q for q in queues if q != backlogged]
    await _until_consumers(ingress, lambda: not any(ingress.is_paused(q) for q in others))
    assert not ingress.held.over and ingress.held.held == 0
    assert ingress.is_paused(backlogged)  # its own reason still holds

    ingress.on_waiting(backlogged, 0)
    await _until_consumers(ingress, lambda: not ingress.is_paused(backlogged))
    await producer.publish("inference", task(args={"n": 1}), reply_to=inbox.name)
    await inbox.wait_for(3)
    answers = [r.payload for r in inbox.messages]
    assert [a["status"] for a in answers] == ["ok", "ok", "ok"], answers
    Figures(
        case="held-bytes-pause-and-backpressure",
        sent=3,
        answered=len(answers),
        lost=3 - len(answers),
        duplicated=len(inbox.messages) - 3,
        peak_rss_mb=peak_rss_mb(),
        ready=ingress.consuming,
    ).check()


async def test_shared_read_answers_each_caller_with_a_read_begun_after_it_asked() -> None:
    """However many ask at once, one read runs and at most one waits; no caller gets a read
    that started before its request (it would miss what changed just before it asked)."""
    started: list[int] = []
    running, release = asyncio.Event(), asyncio.Event()

    async def read() -> int:
        started.append(len(started) + 1)
        number = len(started)
        running.set()
        await release.wait()
        return number

    shared = SharedRead(read)
    first = asyncio.create_task(shared())
    await running.wait()
    later = [asyncio.create_task(shared()) for _ in range(DEPTH_READS)]
    await asyncio.sleep(0)  # let every later caller ask
    assert started == [1]  # the later callers wait for the next read, not a read each
    release.set()
    assert await first == 1
    assert set(await asyncio.gather(*later)) == {2}  # one read after theirs began, shared
    assert started == [1, 2]
