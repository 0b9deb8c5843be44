"""Tasks longer than RabbitMQ's consumer timeout: the lease is renewed by re-queueing a copy."""

import asyncio
import struct
from pathlib import Path

import msgpack
from conftest import (
    DaemonFactory,
    journaled,
    missing_requirement,
    process_gone,
    ray_actors,
    until,
    until_actors_dead,
    until_journaled,
    when_delivered,
)
from daemon_process import DaemonProcess
from rabbit import RabbitServer
from raw import RawProducer, task
from rawamqp import RawAmqp, longstr, properties, table

DIAGNOSTICS = "workers.diagnostics"


async def test_a_task_outliving_its_lease_runs_once_and_answers_once(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    daemon = await start_daemon(handler_modules=[DIAGNOSTICS], lease_renew_s=0.3)
    assert daemon.ingress is not None
    gate, journal = tmp_path / "gate", tmp_path / "runs"
    # The task, then two of its renewal copies back at this daemon while it still runs.
    copies_back = when_delivered(daemon, 3)
    inbox = await producer.inbox()
    args = {"path": str(gate), "journal": str(journal)}
    await producer.publish(
        "training", task("training", "wait_file", args, id="long-lease"), reply_to=inbox.name
    )
    await asyncio.wait_for(copies_back.wait(), 60)
    gate.touch()
    reply = await inbox.one()
    assert reply.payload["status"] == "ok"
    assert reply.payload["attempts"] == 1
    # Had any delivery been held past the timeout, RabbitMQ would have closed the channel
    # and redelivered it.
    assert daemon.ingress.redelivered == 0
    # A sentinel behind the renewal copies: once it is answered, every copy was consumed.
    await producer.publish("training", task("training", "echo", "sentinel"), reply_to=inbox.name)
    await inbox.wait_for(2)
    assert inbox.messages[0].payload["id"] == "long-lease"
    assert len(inbox.messages) == 2  # the copies were acknowledged without replies
    runs = journaled(journal)
    assert [event for event, _ in runs] == ["started", "finished"], runs  # one run
    depths = await daemon.ingress.queue_depths()
    assert depths["swarm.tasks.training"] == 0


async def test_daemon_killed_after_a_renewal_the_copy_carries_the_task(
    amqp_url: str, ray_address: str, producer: RawProducer, tmp_path: Path
) -> None:
    """The run in the killed daemon dies with it; its renewal copy, left in the queue, is
    run once more by the next daemon (one run there) and answered once."""
    journal, gate = tmp_path / "runs", tmp_path / "gate"
    # One lease secret for both daemons, as a deployment with a standby would have: the second
    # recognises the first's renewal copies (broker/tasks/leases.py).
    secret = "shared-lease-secret"
    first = await DaemonProcess(
        amqp_url, ray_address, handler_modules=DIAGNOSTICS, lease_renew_s=0.3, lease_secret=secret
    ).start()
    inbox = await producer.inbox("long-replies", durable=True)
    args = {"path": str(gate), "journal": str(journal)}
    await producer.publish(
        "training", task("training", "wait_file", args, id="carried"), reply_to=inbox.name
    )
    [(_, first_pid)] = await until_journaled(journal, 1)  # running in the first daemon
    await first.logged("lease_renewed", count=2)  # the original delivery is acked by now
    [first_actor] = [
        actor_id
        for actor_id, actor in (await ray_actors()).items()
        if actor["Pid"] == first_pid and actor["State"] == "ALIVE"
    ]
    first.kill()
    await first.wait()
    # Ray ends a dead driver's actors, and the run with them: only once its process is gone
    # (Ray marks the actor dead before its process exits) is the gate opened.
    await until_actors_dead({first_actor}, "the killed daemon's actor ends")
    await until(lambda: process_gone(first_pid), f"the killed daemon's actor {first_pid} exits")
    gate.touch()
    second = await DaemonProcess(
        amqp_url, ray_address, handler_modules=DIAGNOSTICS, lease_secret=secret
    ).start()
    try:
        reply = await inbox.one()
        # A sentinel behind the copies: once it is answered, every copy was consumed.
        sentinel = await producer.inbox()
        await producer.publish(
            "training", task("training", "echo", "sentinel", id="sentinel"), reply_to=sentinel.name
        )
        await sentinel.one()
    finally:
        second.terminate()
        code = await second.wait()
        assert code == 0, "\n".join(second.other[-20:])
    assert reply.payload["id"] == "carried"
    assert reply.payload["status"] == "ok"
    assert len(inbox.messages) == 1  # answered once
    runs = journaled(journal)
    # Begun in the first daemon, never finished there; run once, to the end, in the second.
    second_pid = runs[1][1] if len(runs) > 1 else 0
    assert second_pid != first_pid, runs
    assert runs == [("started", first_pid), ("started", second_pid), ("finished", second_pid)]


async def test_longer_than_rabbitmq_consumer_timeout(
    start_daemon: DaemonFactory, producer: RawProducer, rabbit: RabbitServer
) -> None:
    """RabbitMQ's consumer timeout shortened to 2 s (it is checked once a minute): a 70 s task
    still runs once and is answered once, because no delivery is held past a lease."""
    if not rabbit.can_make_vhosts:
        missing_requirement("needs rabbitmqctl to shorten the broker's consumer_timeout")
    rabbit.rabbitmqctl("eval", "application:set_env(rabbit, consumer_timeout, 2000).")
    try:
        daemon = await start_daemon(lease_renew_s=1.0)
        assert daemon.ingress is not None
        inbox = await producer.inbox()
        await producer.publish(
            "training",
            task("training", "sleep", {"seconds": 70}, id="marathon"),
            reply_to=inbox.name,
        )
        reply = await inbox.one(timeout_s=180)
    finally:
        rabbit.rabbitmqctl("eval", "application:set_env(rabbit, consumer_timeout, 1800000).")
    assert reply.payload["status"] == "ok"
    assert reply.payload["attempts"] == 1
    # Had any delivery been held past the timeout, RabbitMQ would have closed the channel
    # and redelivered it.
    assert daemon.ingress.redelivered == 0
    assert daemon.ingress.received > 1  # the renewal copies came back and were settled


async def test_renewal_copies_carry_headers_no_decoder_could_encode_again(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str
) -> None:
    """A long task whose headers hold a non-UTF-8 string, a double of 1e300 and a 200-byte key
    (pamqp decodes them, then cannot or will not encode them back): its renewal copies carry
    them byte for byte, so the lease is renewed and the task runs and answers once."""
    daemon = await start_daemon(handler_modules=[DIAGNOSTICS], lease_renew_s=0.3)
    assert daemon.ingress is not None
    odd = [
        (b"x-bytes", b"S" + longstr(b"\xff\xfe not utf-8")),
        (b"x-big", b"d" + struct.pack(">d", 1e300)),
        (b"k" * 200, b"S" + longstr(b"long key")),
    ]
    inbox = await producer.inbox()
    body = msgpack.packb(task("training", "sleep", {"seconds": 1.5}, id="odd-lease"))
    async with await RawAmqp.connect(amqp_url) as raw:
        await raw.publish(
            "swarm.tasks",
            "training",
            properties(
                content_type=b"application/msgpack",
                headers=table(odd),
                reply_to=inbox.name.encode(),
                correlation_id=b"odd",
            ),
            body,
        )
        reply = await inbox.one()
    assert reply.payload["status"] == "ok"
    assert reply.payload["attempts"] == 1
    assert daemon.ingress.redelivered == 0
    # Copies were made and came back (a copy that could not be encoded was never made).
    assert daemon.ingress.received > 1


async def test_renewal_copies_held_by_their_daemon_do_not_pile_up_in_memory(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    """Each renewal copy of a task running here comes back to this daemon and is held until
    the next renewal or the task's end; its body is let go at once, so the bytes held stay
    those of the task and a copy or two, not one more body per renewal."""
    daemon = await start_daemon(handler_modules=[DIAGNOSTICS], lease_renew_s=0.2)
    assert daemon.ingress is not None
    inbox = await producer.inbox()
    body = task("training", "sleep", {"seconds": 3.0, "pad": "x" * 1_000_000}, id="big-lease")
    await producer.publish("training", body, reply_to=inbox.name)
    reply = await inbox.one()
    assert reply.payload["status"] == "ok"
    assert reply.payload["attempts"] == 1
    copies = daemon.ingress.received - 1
    assert copies >= 5  # renewed every 0.2 s over a 3 s run
    # A sentinel behind the copies: once it is answered, every copy was consumed and settled.
    await producer.publish("training", task("training", "echo", "sentinel"), reply_to=inbox.name)
    await inbox.wait_for(2)
    assert len(inbox.messages) == 2  # the copies were acknowledged without replies
    # The original, the copy being consumed and the one just queued: never one per renewal.
    assert daemon.ingress.held.peak < 4 * 1_000_000, (daemon.ingress.held.peak, copies)
    depths = await daemon.ingress.queue_depths()
    assert depths["swarm.tasks.training"] == 0
