"""W3C trace context from a task to its reply, its swarm.results copy and the daemon's logs."""

from daemon_process import DaemonProcess
from raw import RawProducer, task

from broker.daemon import Daemon

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


async def test_reply_and_results_copy_carry_a_child_span_of_the_tasks_trace(
    daemon: Daemon, producer: RawProducer
) -> None:
    inbox = await producer.inbox()
    results = await producer.watch_results()
    await producer.publish(
        "inference",
        task(args=1),
        reply_to=inbox.name,
        headers={"traceparent": TRACEPARENT, "tracestate": "shop=1"},
    )
    reply = await inbox.one()
    version, trace_id, span_id, flags = reply.headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert span_id != "00f067aa0ba902b7", "the daemon's own span, parented by the producer's"
    assert reply.headers["tracestate"] == "shop=1"
    copy = await results.one()
    assert copy.headers["traceparent"] == reply.headers["traceparent"]

    await producer.publish("inference", task(args=2), reply_to=inbox.name)
    await inbox.wait_for(2)
    assert "traceparent" not in inbox.messages[1].headers, "no trace is invented"


async def test_the_daemons_logs_carry_the_trace(
    amqp_url: str, ray_address: str, producer: RawProducer
) -> None:
    daemon = await DaemonProcess(amqp_url, ray_address).start()
    try:
        inbox = await producer.inbox()
        await producer.publish(
            "inference",
            task(handler="no_such_handler"),
            reply_to=inbox.name,
            headers={"traceparent": TRACEPARENT},
        )
        reply = await inbox.one()
        await daemon.logged("task_rejected")
    finally:
        daemon.terminate()
        assert await daemon.wait() == 0
    entry = next(e for e in daemon.log if e.get("event") == "task_rejected")
    assert entry["trace_id"] == TRACE_ID
    assert reply.headers["traceparent"] == f"00-{TRACE_ID}-{entry['span_id']}-01"
