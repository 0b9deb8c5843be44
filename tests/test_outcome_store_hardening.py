"""The outcome store under hostile sizes, drops and bodies, on the real RabbitMQ and Ray.

- a reply over 8 MiB (the task-body limit) is read back from the stream and answers its
  duplicates; one over SWARM_OUTCOME_MAX_REPLY_MB is answered but not remembered;
- a body refused at intake is not its id's outcome: a corrected body of the id runs, and a
  finished id keeps its stored reply;
- a reconnect resumes the stream's replay from the last offset applied;
- a second drop during a replay fails that replay at once (it is resumed on the next
  session), instead of waiting out a fixed time limit.
"""

import asyncio
import contextlib
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
from conftest import DaemonFactory
from hardening import Figures, peak_rss_mb
from netproxy import TcpProxy
from rabbit import RabbitServer
from raw import RawProducer, task

from broker.amqp.outcome_replay import OUTCOMES_QUEUE
from broker.amqp.outcomes import MIB, OutcomeStore
from broker.daemon import Daemon
from broker.tasks.outcome import succeeded

DIAGNOSTICS = ["workers.diagnostics"]


def runs(path: Path) -> int:
    """Runs of the `journal` handler that wrote to `path` (one line each)."""
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def stored_reply(task_id: str, result: Any) -> bytes:
    """A reply body as a daemon would have recorded it."""
    return succeeded(
        task_id,
        "inference",
        msgpack.packb(result),
        attempts=1,
        pool="cpu",
        node="standby",
        queued_ms=0.0,
        run_ms=1.0,
    ).reply_body


async def append_records(producer: RawProducer, records: list[bytes]) -> None:
    """Append records to the outcome stream as another daemon (a standby) would."""
    for record in records:
        await producer.channel.default_exchange.publish(
            aio_pika.Message(record, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            OUTCOMES_QUEUE,
        )


async def tail_reached(daemon: Daemon, producer: RawProducer) -> None:
    """Until the daemon's tail has applied everything in the stream so far: a cancel record
    appended now is applied after all that came before it."""
    sync_id = f"sync-{id(producer)}-{daemon.store.replay.stats.applied_total}"
    cancel = msgpack.packb({"k": "cancel", "id": sync_id, "t": time.time()})
    await append_records(producer, [cancel])
    await daemon.store.replay.wait_until(lambda _: daemon.store.cancel_pending(sync_id))


async def answered(daemon: Daemon, producer: RawProducer) -> bool:
    """The daemon consumes: a fresh task is answered `ok`."""
    inbox = await producer.inbox()
    await producer.publish("inference", task("inference", "echo", "ping"), reply_to=inbox.name)
    reply = await inbox.one()
    return bool(reply.payload["status"] == "ok" and daemon.ingress and daemon.ingress.consuming)


class SlowLink(TcpProxy):
    """The test proxy with a slow network: each direction moves at most `bytes_per_s`.
    (The pause is the link's speed, not a wait for an event.)"""

    def __init__(self, bytes_per_s: float) -> None:
        super().__init__(chunk_bytes=16 * 1024)
        self.bytes_per_s = bytes_per_s

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(self._chunk_bytes):
                await self._flowing.wait()
                if writer.is_closing():
                    return
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(len(data) / self.bytes_per_s)


# -- item 6: results over 8 MiB ---------------------------------------------------------------
async def test_a_reply_over_8_mib_answers_its_duplicates_across_a_restart(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    journal = tmp_path / "runs"
    # `journal` returns its entry: a 9 MiB entry is a 9 MiB result (the task body is raised
    # over the 8 MiB default to carry it).
    body = task("data_processing", "journal", {"path": str(journal), "entry": "x" * (9 * MIB)})
    settings: dict[str, Any] = {"handler_modules": DIAGNOSTICS, "max_body_bytes": 16 * MIB}
    first = await start_daemon(**settings)
    replies = []
    for _ in range(2):
        inbox = await producer.inbox()
        await producer.publish("data_processing", body, reply_to=inbox.name)
        replies.append(await inbox.one())
    assert len(replies[0].body) > 9 * MIB
    await first.stop()
    # A new daemon reads the 9 MiB record back from the stream.
    second = await start_daemon(**settings)
    inbox = await producer.inbox()
    await producer.publish("data_processing", body, reply_to=inbox.name)
    replies.append(await inbox.one())
    assert [r.payload["status"] for r in replies] == ["ok"] * 3
    assert replies[1].body == replies[0].body and replies[2].body == replies[0].body
    Figures(
        case="reply_over_8_mib",
        sent=3,
        answered=len(replies),
        lost=3 - len(replies),
        duplicated=runs(journal) - 1,  # runs beyond the first
        peak_rss_mb=peak_rss_mb(),
        ready=await answered(second, producer),
    ).check()
    assert runs(journal) == 1


async def test_a_reply_over_the_store_limit_is_answered_but_not_remembered(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    journal = tmp_path / "runs"
    daemon = await start_daemon(handler_modules=DIAGNOSTICS, outcome_max_reply_mb=1)
    body = task("data_processing", "journal", {"path": str(journal), "entry": "y" * (2 * MIB)})
    replies = []
    for _ in range(2):
        inbox = await producer.inbox()
        await producer.publish("data_processing", body, reply_to=inbox.name)
        replies.append(await inbox.one())
    assert [r.payload["status"] for r in replies] == ["ok", "ok"]
    # The documented rule: not remembered, so the duplicate ran again.
    assert runs(journal) == 2
    assert daemon.store.unrecorded == 2 and daemon.store.get(body["id"]) is None
    Figures(
        case="reply_over_store_limit",
        sent=2,
        answered=len(replies),
        lost=2 - len(replies),
        peak_rss_mb=peak_rss_mb(),
        ready=await answered(daemon, producer),
    ).check()


# -- item 11: a refused body is not its id's outcome --------------------------------------------
async def test_a_refused_body_does_not_decide_its_ids_outcome(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    journal = tmp_path / "runs"
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    dead = await producer.watch_dead()
    inbox = await producer.inbox()
    args = {"path": str(journal)}

    async def send(body: dict[str, Any], **properties: Any) -> dict[str, Any]:
        before = len(inbox.messages)
        await producer.publish("inference", body, reply_to=inbox.name, **properties)
        await inbox.wait_for(before + 1)
        return dict(inbox.messages[before].payload)

    def last_reply_bytes() -> bytes:
        return inbox.messages[-1].body

    # An empty body id: answered under message_id, which must not name a stored outcome.
    refused = await send(task("inference", "journal", args, id=""), message_id="order-X")
    assert (refused["id"], refused["error"]["code"]) == ("order-X", "invalid")
    assert daemon.store.get("order-X") is None
    # The producer fixes the body: the task runs.
    fixed = await send(task("inference", "journal", args, id="order-X"))
    assert fixed["status"] == "ok" and runs(journal) == 1
    # Recorded once its record is confirmed, just after the reply: the tail sees it too.
    await daemon.store.replay.wait_until(lambda _: daemon.store.get("order-X") is not None)
    stored = daemon.store.get("order-X")
    assert stored is not None
    # A body that is not valid, naming the finished id: its own rejection, not the stored reply.
    invalid = await send(task("inference", "journal", args, id="order-X", bogus=1))
    assert (invalid["id"], invalid["error"]["code"]) == ("order-X", "invalid")
    # Every other intake refusal is not recorded either: unknown handler, then fixed.
    unknown = await send(task("inference", "no_such_handler", args, id="order-Y"))
    assert unknown["error"]["code"] == "unknown_handler"
    assert (await send(task("inference", "journal", args, id="order-Y")))["status"] == "ok"
    # A valid duplicate of the finished id is still answered from the store, byte for byte.
    again = await send(task("inference", "journal", args, id="order-X"))
    assert again["status"] == "ok" and last_reply_bytes() == stored.reply_body
    assert runs(journal) == 2  # order-X once, order-Y once
    await dead.wait_for(3)  # the three refusals, each dead-lettered
    codes = sorted(m.headers["x-swarm-error-code"] for m in dead.messages)
    Figures(
        case="refused_body_then_fixed",
        sent=6,
        answered=len(inbox.messages),
        lost=6 - len(inbox.messages),
        dead_letters=len(dead.messages),
        peak_rss_mb=peak_rss_mb(),
        ready=await answered(daemon, producer),
    ).check(dead_letters=3)
    assert codes == ["invalid", "invalid", "unknown_handler"]


# -- item 8: a reconnect resumes the replay from the last offset ------------------------------
async def test_a_reconnect_replays_only_what_was_appended_meanwhile(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str, tmp_path: Path
) -> None:
    journal = tmp_path / "runs"
    async with TcpProxy() as proxy:
        daemon = await start_daemon(amqp_url=proxy.url_for(amqp_url), handler_modules=DIAGNOSTICS)
        reader = daemon.store.replay
        inbox = await producer.inbox()
        for n in range(20):  # twenty outcomes in the stream before the drop
            body = task("inference", "journal", {"path": str(journal)}, id=f"before-{n}")
            await producer.publish("inference", body, reply_to=inbox.name)
        await inbox.wait_for(20)
        await tail_reached(daemon, producer)
        offset_at_drop = reader.next_offset
        assert offset_at_drop is not None and offset_at_drop > 1

        # The link drops; while the daemon is away, a standby records five outcomes.
        proxy.block()
        await proxy.cut()
        meanwhile = {f"meanwhile-{n}": stored_reply(f"meanwhile-{n}", n) for n in range(5)}
        writer = OutcomeStore(3600)
        await append_records(
            producer, [writer.outcome_record(k, "ok", v) or b"" for k, v in meanwhile.items()]
        )
        proxy.unblock()
        await reader.wait_until(lambda stats: stats.completed >= 2)

        # The second replay started where the tail stopped and read just those five.
        assert reader.stats.from_offset == offset_at_drop
        assert reader.stats.applied == 5
        # And they answer their duplicates: nothing runs.
        again = await producer.inbox()
        body = task("inference", "journal", {"path": str(journal)}, id="meanwhile-3")
        await producer.publish("inference", body, reply_to=again.name)
        assert (await again.one()).body == meanwhile["meanwhile-3"]
        ready = await answered(daemon, producer)
        Figures(
            case="reconnect_resumes_replay",
            sent=21,
            answered=len(inbox.messages) + len(again.messages),
            lost=21 - len(inbox.messages) - len(again.messages),
            duplicated=runs(journal) - 20,
            peak_rss_mb=peak_rss_mb(),
            ready=ready,
        ).check()
        await daemon.stop()


# -- item 7: a second drop during the replay ----------------------------------------------------
async def test_a_drop_during_the_replay_fails_it_at_once_and_the_next_resumes(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str
) -> None:
    records = 64
    async with SlowLink(bytes_per_s=1024 * 1024) as link:
        daemon = await start_daemon(amqp_url=link.url_for(amqp_url))
        reader = daemon.store.replay
        # The first drop; while the daemon is away, a standby records 64 outcomes of 100 KB:
        # about 6 s of replay on this 1 MB/s link.
        link.block()
        await link.cut()
        writer = OutcomeStore(3600)
        meanwhile = {f"big-{n}": stored_reply(f"big-{n}", "z" * 100_000) for n in range(records)}
        await append_records(
            producer, [writer.outcome_record(k, "ok", v) or b"" for k, v in meanwhile.items()]
        )
        link.unblock()
        # The second drop, while that replay is under way.
        await reader.wait_until(lambda stats: stats.started >= 2 and stats.applied >= 1)
        await link.cut()
        await reader.wait_until(lambda stats: stats.lost + stats.stalled + stats.failed >= 1)
        # It failed because its connection went, at once: not for want of progress, and not
        # by a timeout.
        assert (reader.stats.lost, reader.stats.stalled, reader.stats.failed) == (1, 0, 0)
        applied_before_drop = reader.stats.applied
        resume_at = reader.next_offset
        await reader.wait_until(lambda stats: stats.completed >= 2, timeout_s=120)
        # The next session resumed where the dropped replay stopped: each record read once.
        assert reader.stats.from_offset == resume_at
        assert applied_before_drop + reader.stats.applied == records
        assert all(daemon.store.get(task_id) is not None for task_id in meanwhile)
        ready = await answered(daemon, producer)
        Figures(
            case="second_drop_during_replay",
            sent=1,
            answered=1 if ready else 0,
            lost=0 if ready else 1,
            peak_rss_mb=peak_rss_mb(),
            ready=ready,
        ).check()
        await daemon.stop()


async def test_a_stalled_replay_fails_on_progress_and_leaves_no_session_behind(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str, rabbit: RabbitServer
) -> None:
    records = 64
    async with SlowLink(bytes_per_s=1024 * 1024) as link:
        daemon = await start_daemon(amqp_url=link.url_for(amqp_url))
        reader = daemon.store.replay
        # A replay fails when no message arrived for this long, however long it takes overall.
        reader.stall_s = 1.0
        link.block()
        await link.cut()
        writer = OutcomeStore(3600)
        meanwhile = {f"big-{n}": stored_reply(f"big-{n}", "z" * 100_000) for n in range(records)}
        await append_records(
            producer, [writer.outcome_record(k, "ok", v) or b"" for k, v in meanwhile.items()]
        )
        link.unblock()
        await reader.wait_until(lambda stats: stats.started >= 2 and stats.applied >= 1)
        # The link stops moving bytes but stays open: the replay fails for want of progress.
        link.stall()
        await reader.wait_until(lambda stats: stats.stalled >= 1)
        assert (reader.stats.lost, reader.stats.failed) == (0, 0)
        link.resume()
        # The next replay takes several times `stall_s` on this link, and completes: the
        # limit is on progress, not on the replay's length.
        await reader.wait_until(lambda stats: stats.completed >= 2, timeout_s=120)
        assert reader.stats.applied_total == records
        ready = await answered(daemon, producer)
        # The stalled session was closed, its stream consumer with it: the daemon holds one
        # connection on this vhost.
        vhost = urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path[1:])
        listing = rabbit.rabbitmqctl("list_connections", "-q", "vhost", "client_properties")
        daemon_connections = [
            line
            for line in listing.splitlines()
            if line.startswith(vhost + "\t") and "swarm-daemon" in line
        ]
        assert len(daemon_connections) == 1, listing
        Figures(
            case="stalled_replay",
            sent=1,
            answered=1 if ready else 0,
            lost=0 if ready else 1,
            peak_rss_mb=peak_rss_mb(),
            ready=ready,
        ).check()
        await daemon.stop()
