"""Time to ready with a large outcome store: how long the outcome stream's replay takes, on a
local link and behind a slow one, and what a drop in the middle of it costs.

    .venv/bin/python bench/outcome_replay.py                      # 1 GB of 256 KB records
    .venv/bin/python bench/outcome_replay.py --mb 200 --record-bytes 300
    .venv/bin/python bench/outcome_replay.py --mb 200 --link-mb-s 4 --drop-at 0.5

On a fresh vhost it fills `swarm.outcomes` with `--mb` of outcome records (as daemons write
them), then opens a session as the daemon does (broker/amqp/session.py) and times
`OutcomeStore.attach`: the replay is what stands between a daemon and ready that grows with
the store (the rest, Ray and the pools, does not). With `--link-mb-s` the replay goes through
a local proxy moving at most that many MB/s each way; with `--drop-at F` the link is cut once
a fraction F of the records is applied, and the next session resumes the replay. Prints one
line per phase and a JSON summary. Needs RabbitMQ and `rabbitmqctl` (for the vhost).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import resource
import sys
import time
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import Rabbit, wait_for_vhost_deletes

from broker.amqp.outcome_replay import OUTCOMES_QUEUE
from broker.amqp.outcomes import MIB, OutcomeStore, stream_arguments
from broker.amqp.session import AmqpSession

RETENTION_S = 7 * 24 * 3600.0
FILL_WINDOW = 64  # confirms outstanding while filling


async def fill(url: str, total_bytes: int, record_bytes: int) -> int:
    """Append records until `total_bytes` of replies are in the stream; returns the count."""
    writer = OutcomeStore(RETENTION_S, max_bytes=1 << 40, max_reply_bytes=1 << 40)
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(
            OUTCOMES_QUEUE, durable=True, arguments=stream_arguments(RETENTION_S)
        )
        reply = b"r" * record_bytes
        count = total_bytes // record_bytes
        pending: set[asyncio.Future[object]] = set()
        for n in range(count):
            record = writer.outcome_record(f"task-{n}", "ok", reply)
            assert record is not None
            pending.add(
                asyncio.ensure_future(
                    channel.default_exchange.publish(
                        aio_pika.Message(record, delivery_mode=2), OUTCOMES_QUEUE
                    )
                )
            )
            if len(pending) >= FILL_WINDOW:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    future.result()
        await asyncio.gather(*pending)
        return count
    finally:
        await connection.close()


class SlowLink:
    """A local TCP forwarder to RabbitMQ moving at most `bytes_per_s` each way."""

    def __init__(self, target_port: int, bytes_per_s: float) -> None:
        self.target_port = target_port
        self.bytes_per_s = bytes_per_s
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> SlowLink:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        return self

    async def close(self) -> None:
        self.cut()
        self._server.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(
                self._pump(reader, up_writer),
                self._pump(up_reader, writer),
                return_exceptions=True,
            )
        for each in (writer, up_writer):
            each.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(64 * 1024):
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(len(data) / self.bytes_per_s)  # the link's speed


def via(url: str, port: int) -> str:
    scheme, rest = url.split("://", 1)
    credentials, _, tail = rest.rpartition("@")
    path = tail.split("/", 1)[1] if "/" in tail else ""
    return f"{scheme}://{credentials}@127.0.0.1:{port}/{path}"


async def replay(url: str, store: OutcomeStore) -> float:
    """One session and one attach, as the daemon opens them; returns the attach's seconds."""
    session = await AmqpSession.open(url, prefetch=16)
    started = time.monotonic()
    try:
        await store.attach(session.connection, session.publish_channel)
        return time.monotonic() - started
    finally:
        await store.detach()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.close(), 5)


async def replay_with_drop(url: str, store: OutcomeStore, link: SlowLink, at: int) -> None:
    """A replay cut once `at` records are applied; then the next session resumes it."""
    reader = store.replay

    async def cut_when_reached() -> None:
        await reader.wait_until(lambda stats: stats.applied >= at, timeout_s=3600)
        link.cut()

    cutter = asyncio.ensure_future(cut_when_reached())
    try:
        await replay(url, store)
    except Exception as exc:
        print(f"replay 1: failed after {reader.stats.applied} records: {exc}")
    finally:
        cutter.cancel()


async def main(args: argparse.Namespace) -> None:
    rabbit = Rabbit(args.amqp_url)
    with rabbit.fresh_vhost("replay") as url:
        started = time.monotonic()
        count = await fill(url, args.mb * MIB, args.record_bytes)
        fill_s = time.monotonic() - started
        stream_mb = count * (args.record_bytes + 60) / MIB  # + the record's own fields
        print(f"filled: {count} records, {stream_mb:.0f} MB, in {fill_s:.1f} s")
        store = OutcomeStore(RETENTION_S)
        target = url
        link = None
        if args.link_mb_s:
            port = int(url.split("://", 1)[1].rpartition("@")[2].split("/")[0].split(":")[1])
            link = await SlowLink(port, args.link_mb_s * MIB).start()
            target = via(url, link.port)
        started = time.monotonic()
        if link is not None and args.drop_at:
            await replay_with_drop(target, store, link, int(count * args.drop_at))
        seconds_last = await replay(target, store)
        total_s = time.monotonic() - started
        stats = store.replay.stats
        summary = {
            "records": count,
            "record_bytes": args.record_bytes,
            "stream_mb": round(stream_mb),
            "fill_s": round(fill_s, 1),
            "link_mb_s": args.link_mb_s or None,
            "drop_at": args.drop_at if link is not None else None,
            "ready_s": round(total_s, 1),
            "last_replay_s": round(seconds_last, 1),
            "replays": stats.started,
            "records_applied_total": stats.applied_total,
            "last_replay_from_offset": stats.from_offset,
            "last_replay_applied": stats.applied,
            "read_mb_s": round(stream_mb / total_s, 1),
            "index_mb": round(store.memory_bytes / MIB),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
        print(json.dumps(summary))
        if link is not None:
            await link.close()
    wait_for_vhost_deletes()


if __name__ == "__main__":
    # aiormq logs every cut connection with its traceback; the replay reports it in one line.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--mb", type=int, default=1024, help="reply bytes to fill, in MiB")
    parser.add_argument("--record-bytes", type=int, default=256 * 1024)
    parser.add_argument("--link-mb-s", type=float, default=0.0, help="slow link, MiB/s")
    parser.add_argument("--drop-at", type=float, default=0.0, help="cut at this fraction")
    asyncio.run(main(parser.parse_args()))
