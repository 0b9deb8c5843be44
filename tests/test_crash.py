"""At least once across a daemon killed with SIGKILL mid-batch."""

import pytest
from daemon_process import DaemonProcess
from raw import RawProducer, task

TASKS = 1000


@pytest.mark.timeout(600)
async def test_sigkill_with_1000_in_flight_loses_nothing(
    amqp_url: str, ray_address: str, producer: RawProducer
) -> None:
    first = await DaemonProcess(amqp_url, ray_address).start()
    inbox = await producer.inbox("crash-replies", durable=True)
    ids = [f"crash-{n}" for n in range(TASKS)]
    for task_id in ids:
        await producer.publish(
            "inference",
            task(id=task_id, handler="sleep", args={"seconds": 0.05}),
            reply_to=inbox.name,
        )
    await inbox.wait_for(20)
    first.kill()
    await first.wait()
    answered_before_restart = len(inbox.messages)

    second = await DaemonProcess(amqp_url, ray_address).start()
    try:
        await inbox.wait_until(lambda _: len(inbox.distinct_ids()) == TASKS, timeout_s=300)
        replies = {r.payload["id"]: r.payload for r in inbox.messages}
    finally:
        second.terminate()
        assert await second.wait() == 0
    print(
        f"sent={TASKS} answered before restart={answered_before_restart} "
        f"distinct replies={len(replies)} total replies={len(inbox.messages)} "
        f"lost={TASKS - len(replies)}"
    )
    assert answered_before_restart < TASKS, "the kill must land mid-batch"
    assert set(replies) == set(ids)
    assert all(reply["status"] == "ok" for reply in replies.values())
