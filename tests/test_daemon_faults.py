"""The daemon process under faults: SIGTERM drain, a standby taking over, restarts that leak
nothing."""

import asyncio

import ray
from daemon_process import DaemonProcess
from raw import RawProducer, task


async def _cluster_cpus_free() -> float:
    return float((await asyncio.to_thread(ray.available_resources)).get("CPU", 0.0))


async def _until_cpus_free(expected: float, timeout_s: float = 60.0) -> float:
    """Ray reports freed reservations with a short delay; poll it (no event exists for it)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        free = await _cluster_cpus_free()
        if free >= expected or asyncio.get_running_loop().time() > deadline:
            return free
        await asyncio.sleep(0.2)


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
        await inbox.wait_until(lambda _: inbox.distinct_ids() == set(ids), timeout_s=120)
    finally:
        successor.terminate()
        assert await successor.wait() == 0
    duplicated = len(inbox.messages) - len(ids)
    print(
        f"fault=sigterm sent={len(ids)} answered_before={answered} "
        f"replies={len(inbox.messages)} lost=0 duplicated={duplicated}"
    )
    assert duplicated == 0  # a drained daemon hands back untouched work only


async def test_standby_takes_over_when_the_active_daemon_dies(
    amqp_url: str, ray_address: str, producer: RawProducer
) -> None:
    active = await DaemonProcess(amqp_url, ray_address).start()
    standby = await DaemonProcess(amqp_url, ray_address).start()
    inbox = await producer.inbox("standby-replies", durable=True)
    try:
        await producer.publish("inference", task(id="before"), reply_to=inbox.name)
        await inbox.wait_for(1)
        active.kill()
        await active.wait()
        killed_at = asyncio.get_running_loop().time()
        ids = [f"after-{n}" for n in range(50)]
        for task_id in ids:
            await producer.publish("inference", task(id=task_id), reply_to=inbox.name)
        # Only the standby is left to answer them.
        await inbox.wait_until(lambda _: set(ids) <= inbox.distinct_ids(), timeout_s=60)
        took_s = asyncio.get_running_loop().time() - killed_at
    finally:
        standby.terminate()
        assert await standby.wait() == 0
    print(
        f"fault=active-killed sent=50 replies={len(inbox.messages) - 1} lost=0 "
        f"takeover_and_50_replies_s={took_s:.2f}"
    )


async def test_kill_and_restart_orphan_no_actors(
    amqp_url: str, ray_address: str, producer: RawProducer
) -> None:
    free_before = await _cluster_cpus_free()
    for _ in range(2):
        daemon = await DaemonProcess(amqp_url, ray_address, cpu_pool_min=2, cpu_pool_max=2).start()
        assert await _cluster_cpus_free() <= free_before - 2  # its two actors hold 2 CPUs
        daemon.kill()
        await daemon.wait()
        assert await _until_cpus_free(free_before) == free_before
