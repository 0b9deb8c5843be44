"""Headers that change what the daemon does are accepted only from Swarm itself."""

from pathlib import Path

import pytest
from conftest import DaemonFactory
from hardening import Figures
from raw import RawProducer, task

from broker.tasks.delivery import LEASE_HEADER

DIAGNOSTICS = ["workers.diagnostics"]


def runs(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("forged", [1, "1", "1.0123456789abcdef", "7." + "0" * 64])
async def test_a_duplicate_with_a_forged_lease_header_still_gets_its_reply(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path, forged: object
) -> None:
    """A lease header makes the daemon settle a finished task's copy silently; a producer's
    republished duplicate carrying one must be answered from the store like any other."""
    await start_daemon(handler_modules=DIAGNOSTICS)
    journal = tmp_path / "runs"
    first, second = await producer.inbox(), await producer.inbox()
    body = task("data_processing", "journal", {"path": str(journal), "entry": "x"}, id="lease-x")
    await producer.publish("data_processing", body, reply_to=first.name)
    original = await first.one()
    await producer.publish(
        "data_processing", body, reply_to=second.name, headers={LEASE_HEADER: forged}
    )
    duplicate = await second.one()
    assert duplicate.body == original.body
    assert runs(journal) == 1
    Figures(
        case=f"forged-lease-{type(forged).__name__}",
        sent=2,
        answered=len(first.messages) + len(second.messages),
        lost=0,
    ).check()


async def test_a_new_task_with_a_forged_lease_header_runs_and_answers(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    await start_daemon(handler_modules=DIAGNOSTICS)
    journal = tmp_path / "runs"
    inbox = await producer.inbox()
    body = task("data_processing", "journal", {"path": str(journal), "entry": "y"}, id="lease-y")
    await producer.publish("data_processing", body, reply_to=inbox.name, headers={LEASE_HEADER: 3})
    reply = await inbox.one()
    assert reply.payload["status"] == "ok"
    assert runs(journal) == 1
