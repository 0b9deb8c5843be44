"""The Node.js producer example (examples/node) against a real daemon: the contract from
another language, with amqplib and @msgpack/msgpack."""

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from broker.daemon import Daemon

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"
EXTRA_TASKS = 20
PRODUCER_TIMEOUT_S = 120.0
NPM_TIMEOUT_S = 240.0

pytestmark = pytest.mark.requires_tool("node", "npm", why="the Node.js producer example")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """Install the example's locked dependencies once for this module."""
    done = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_S,
    )
    assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return EXAMPLE / "node_modules"


async def run_producer(amqp_url: str, *args: str) -> tuple[int, str, str]:
    """Run producer.js with AMQP_URL set; return its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        "node",
        "producer.js",
        *args,
        cwd=EXAMPLE,
        env={**os.environ, "AMQP_URL": amqp_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), PRODUCER_TIMEOUT_S)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_node_producer_round_trips_every_task_type(
    daemon: Daemon, amqp_url: str, node_modules: Path
) -> None:
    code, stdout, stderr = await run_producer(amqp_url, "--count", str(EXTRA_TASKS))
    assert code == 0, stderr
    lines: list[dict[str, Any]] = [json.loads(line) for line in stdout.splitlines()]
    assert len(lines) == 4 + EXTRA_TASKS
    assert all(
        set(line) == {"id", "type", "handler", "status", "result", "error"} for line in lines
    )
    ids = [line["id"] for line in lines]
    assert len(set(ids)) == len(ids)
    assert all(task_id.startswith("node-") for task_id in ids)

    [failed] = [line for line in lines if line["handler"] == "fail"]
    assert failed["type"] == "inference"
    assert failed["status"] == "error"
    assert failed["result"] is None
    assert failed["error"]["code"] == "handler_error"
    assert "on purpose" in failed["error"]["message"]
    assert failed["error"]["retryable"] is False

    succeeded = [line for line in lines if line["handler"] != "fail"]
    assert all(line["status"] == "ok" and line["error"] is None for line in succeeded)
    results: dict[tuple[str, str], list[Any]] = {}
    for line in succeeded:
        results.setdefault((line["type"], line["handler"]), []).append(line["result"])
    assert results.pop(("training", "sleep")) == [{"seconds": 0.2}]
    assert results.pop(("data_processing", "echo")) == [{"rows": [1, 2, 3]}]
    echoes = results.pop(("inference", "echo"))
    assert results == {}
    assert {"x": 1} in echoes
    assert sorted(echo["n"] for echo in echoes if "n" in echo) == list(range(EXTRA_TASKS))
    assert len(echoes) == 1 + EXTRA_TASKS


async def test_node_producer_reports_a_refused_connection_without_the_password(
    node_modules: Path,
) -> None:
    code, stdout, stderr = await run_producer("amqp://guest:secretpw@127.0.0.1:1/")
    assert code != 0
    assert stdout == ""
    assert "cannot connect to amqp://guest:***@127.0.0.1:1/" in stderr
    assert "ECONNREFUSED" in stderr
    assert "secretpw" not in stderr
