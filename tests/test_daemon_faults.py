"""The daemon process under faults: SIGTERM drain, a standby taking over, restarts that leak
nothing."""

import asyncio
import contextlib

import ray
from conftest import ray_actors, until_actors_dead
from daemon_process import DaemonProcess
from raw import RawProducer, task

REPLY_WAIT_S = 60.0


async def test_sigterm_mid_batch_drains_and_exits_zero(
    amqp_url: str, ray_address: str, producer: RawProducer
) -> None:
    daemon = await DaemonProcess(amqp_url, ray_address, drain_timeout_s=30).start()
    inbox = await producer.inbox("term-replies", durable=True)
    ids = [f"term-{n}" for n in range(200)]
    for task_id in ids:
        await producer.publish(
            "inference",
            task(id=task_id, handler="sleep", args={"seconds": 0.05}),
            reply_to=inbox.name,
        )
    await inbox.wait_for(10)
    daemon.terminate()
    assert await daemon.wait(timeout_s=90) == 0
    answered = len(inbox.distinct_ids())
    assert any(entry.get("event") == "drained" for entry in daemon.log)

    successor = await DaemonProcess(amqp_url, ray_address).start()
    try:
        with contextlib.suppress(asyncio.TimeoutError):  # what is missing is counted below
            await inbox.wait_until(lambda _: inbox.distinct_ids() >= set(ids), timeout_s=120)
    finally:
        successor.terminate()
        assert await successor.wait() == 0
    lost = len(set(ids) - inbox.distinct_ids())
    duplicated = len(inbox.messages) - len(inbox.distinct_ids())
    print(
        f"fault=sigterm sent={len(ids)} answered_before={answered} "
        f"replies={len(inbox.messages)} lost={lost} duplicated={duplicated}"
    )
    assert lost == 0
    assert duplicated == 0  # a drained daemon hands back untouched work only


async def test_standby_takes_over_when_the_active_daemon_dies(
    amqp_url: str, ray_address: str, producer: RawProducer
) -> None:
    active = await DaemonProcess(amqp_url, ray_address).start()
    standby = await DaemonProcess(amqp_url, ray_address).start()
    inbox = await producer.inbox("standby-replies", durable=True)
    ids = [f"after-{n}" for n in range(50)]
    try:
        await producer.publish("inference", task(id="before"), reply_to=inbox.name)
        await inbox.wait_for(1)
        active.kill()
        await active.wait()
        killed_at = asyncio.get_running_loop().time()
        for task_id in ids:
            await producer.publish("inference", task(id=task_id), reply_to=inbox.name)
        # Only the standby is left to answer them.
        with contextlib.suppress(asyncio.TimeoutError):  # what is missing is counted below
            await inbox.wait_until(lambda _: set(ids) <= inbox.distinct_ids(), REPLY_WAIT_S)
        took_s = asyncio.get_running_loop().time() - killed_at
    finally:
        standby.terminate()
        assert await standby.wait() == 0
    answered = inbox.distinct_ids() & set(ids)
    replies = sum(1 for reply in inbox.messages if reply.payload["id"] in answered)
    lost, duplicated = len(ids) - len(answered), replies - len(answered)
    print(
        f"fault=active-killed sent={len(ids)} replies={replies} lost={lost} "
        f"duplicated={duplicated} takeover_and_replies_s={took_s:.2f}"
    )
    assert lost == 0, sorted(set(ids) - answered)
    assert duplicated == 0  # the tasks were published after the kill: one daemon, one reply


async def test_kill_and_restart_orphan_no_actors(
    amqp_url: str, ray_address: str, producer: RawProducer
) -> None:
    """A daemon killed with SIGKILL leaves no actor behind: Ray ends the actors of a driver
    that dies, and every actor the daemon started is Ray's own (none detached). Checked on
    Ray's actor table, for the killed daemon's job: not on free CPUs, which other daemons
    sharing this Ray change."""
    ours = ray.get_runtime_context().get_job_id()
    for _ in range(2):
        before = set(await ray_actors())
        daemon = await DaemonProcess(amqp_url, ray_address, cpu_pool_min=2, cpu_pool_max=2).start()
        started = {
            actor_id: actor
            for actor_id, actor in (await ray_actors()).items()
            if actor_id not in before and actor["JobID"] != ours
        }
        jobs = {actor["JobID"] for actor in started.values()}
        assert len(jobs) == 1, started  # the daemon is one Ray job
        alive = [actor for actor in started.values() if actor["State"] == "ALIVE"]
        assert len(alive) >= 2, started  # its CPU pool at least
        daemon.kill()
        await daemon.wait()
        [job] = jobs
        # Every actor of that job: those seen, and any it started after the look above.
        of_job = {actor_id for actor_id, a in (await ray_actors()).items() if a["JobID"] == job}
        await until_actors_dead(of_job, f"the killed daemon's actors {sorted(of_job)} end")
        assert not any(a["IsDetached"] for a in started.values())
