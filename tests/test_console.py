"""The operator console (`swarm console`) in a real browser, against a real daemon, RabbitMQ
and Ray; and the `task` control request it looks tasks up with."""

import asyncio
from pathlib import Path

from conftest import DaemonFactory, until_journaled, when_waiting

from broker.producer.client import SwarmClient

DIAGNOSTICS = ["workers.diagnostics"]


# -- the `task` control request ------------------------------------------------------------------
async def test_task_lookup_says_waiting_running_done_or_unknown(
    start_daemon: DaemonFactory, amqp_url: str, tmp_path: Path
) -> None:
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    journal, gate = tmp_path / "runs", tmp_path / "gate"
    waiting = when_waiting(daemon, 1)
    async with SwarmClient(amqp_url) as client:
        args = {"path": str(gate), "journal": str(journal)}
        # One CPU actor of one CPU: the second training task waits for the first.
        first = await client.send("training", "wait_file", args, task_id="looked-up-1")
        second = await client.send("training", "wait_file", args, task_id="looked-up-2")
        await until_journaled(journal, 1)
        await asyncio.wait_for(waiting.wait(), 60)
        running = await client.task("looked-up-1")
        assert running["state"] == "running" and running["id"] == "looked-up-1"
        assert (await client.task("looked-up-2"))["state"] == "waiting"
        gate.touch()
        assert (await asyncio.wait_for(first, 60)).status == "ok"
        await asyncio.wait_for(second, 60)
        done = await client.task("looked-up-1")
        assert done["state"] == "done" and done["status"] == "ok"
        assert done["reply"]["id"] == "looked-up-1" and done["reply"]["status"] == "ok"
        assert done["reply"]["result"] == (await first).result
        assert done["reply"]["pool"] == "cpu" and done["reply"]["attempts"] == 1
        unknown = await client.task("never-sent")
        assert unknown["state"] == "unknown" and unknown["cancel_remembered"] is False
