"""The `swarm` command as a user runs it."""

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest
from daemon_process import SWARM

from broker.amqp.urls import redact
from broker.daemon import Daemon

CHECKED_IN_ASYNCAPI = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.json"


async def _swarm(
    *args: str, amqp_url: str, timeout_s: float = 120, **env_extra: str
) -> subprocess.CompletedProcess[str]:
    """Run the CLI without blocking the loop that the in-process daemon lives on."""
    env = {**os.environ, "AMQP_URL": amqp_url, **env_extra}
    process = await asyncio.create_subprocess_exec(
        SWARM, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


async def test_submit_prints_an_ok_reply(daemon: Daemon, amqp_url: str) -> None:
    done = await _swarm("submit", "inference", "echo", "--args", '{"x": 1}', amqp_url=amqp_url)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["status"] == "ok"
    assert reply["result"] == {"x": 1}


async def test_submit_error_reply_exits_2(daemon: Daemon, amqp_url: str) -> None:
    done = await _swarm(
        "submit", "inference", "fail", "--args", '{"message": "no"}', amqp_url=amqp_url
    )
    assert done.returncode == 2
    assert json.loads(done.stdout)["error"]["code"] == "handler_error"


async def test_status_json_reports_the_daemons_pools_queues_and_limits(
    daemon: Daemon, amqp_url: str
) -> None:
    done = await _swarm("status", "--json", amqp_url=amqp_url)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert set(answer) == {"pools", "nodes", "queues", "limits", "rabbitmq"}
    assert answer["rabbitmq"]["node"] == redact(amqp_url)  # the node the daemon is on
    assert set(answer["pools"]) == set(daemon.pools.names)
    cpu = answer["pools"]["cpu"]
    # The daemon fixture's CPU pool: one actor, idle.
    assert (cpu["actors"], cpu["min_actors"], cpu["max_actors"]) == (1, 1, 1)
    assert (cpu["running"], cpu["waiting"]) == (0, 0)
    assert cpu["free"] == cpu["reserved"]
    assert answer["queues"]["swarm.tasks.inference"] == 0
    assert answer["limits"]["prefetch"] == daemon.settings.prefetch
    # The Ray of the test session may list nodes that earlier tests took down: they are shown
    # as dead and hold none of this daemon's actors.
    alive = [node for node in answer["nodes"] if node["alive"]]
    assert alive, answer["nodes"]
    assert [node["actors"] for node in answer["nodes"] if not node["alive"]] == [0] * (
        len(answer["nodes"]) - len(alive)
    )
    assert sum(node["actors"] for node in alive) == sum(
        pool["actors"] for pool in answer["pools"].values()
    )


async def test_status_table_shows_every_pool_and_queue(daemon: Daemon, amqp_url: str) -> None:
    as_json = await _swarm("status", "--json", amqp_url=amqp_url)
    assert as_json.returncode == 0, as_json.stderr
    answer = json.loads(as_json.stdout)
    done = await _swarm("status", amqp_url=amqp_url, COLUMNS="200")  # no wrapped rows
    assert done.returncode == 0, done.stderr
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if "│" in line}
    for name, pool in answer["pools"].items():
        assert rows[name].split("│")[2].strip() == str(pool["actors"]), rows[name]
    for queue, depth in answer["queues"].items():
        assert rows[queue].split("│")[2].strip() == str(depth), rows[queue]


async def test_schema_prints_json_schema() -> None:
    done = await _swarm("schema", amqp_url="")
    assert done.returncode == 0, done.stderr
    schema = json.loads(done.stdout)
    assert schema["task"]["additionalProperties"] is False
    assert "handler" in schema["task"]["required"]


async def test_unreachable_rabbitmq_is_one_clear_line() -> None:
    url = "amqp://guest:secret@127.0.0.1:1/"
    for command in (["submit", "inference", "echo"], ["status"], ["run"]):
        done = await _swarm(*command, amqp_url=url)
        assert done.returncode == 1
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("swarm: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/")
        assert "rabbitmq-server" in last
        assert "Traceback" not in done.stderr
        assert "secret" not in done.stderr


@pytest.mark.parametrize(
    ("credentials", "vhost", "said"),
    [
        ("guest:wrong-password", "", "refused the login of user 'guest': wrong user name or"),
        ("guest:guest", "no-such-vhost", "refused virtual host 'no-such-vhost' to user 'guest'"),
    ],
)
async def test_a_refused_login_or_vhost_is_one_line_that_says_which(
    credentials: str, vhost: str, said: str
) -> None:
    url = f"amqp://{credentials}@127.0.0.1:5672/{vhost}"
    for command in (["status"], ["run"]):
        done = await _swarm(*command, amqp_url=url)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        if command == ["status"]:
            assert len(lines) == 1, done.stderr
        assert lines[-1].startswith("swarm: RabbitMQ at amqp://guest:***@127.0.0.1:5672/")
        assert said in lines[-1]
        assert "cannot reach" not in done.stderr and "Start it" not in done.stderr
        assert "Traceback" not in done.stderr and "wrong-password" not in done.stderr


async def test_unreachable_ray_is_one_clear_line(amqp_url: str) -> None:
    done = await _swarm("run", amqp_url=amqp_url, RAY_ADDRESS="127.0.0.1:1")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("swarm: cannot reach the Ray cluster at 127.0.0.1:1")


async def test_status_watch_redraws_until_its_count(daemon: Daemon, amqp_url: str) -> None:
    done = await _swarm("status", "--watch", "--interval", "0.2", "--count", "3", amqp_url=amqp_url)
    assert done.returncode == 0, done.stderr
    assert "refresh 3 every 0.2 s" in done.stdout
    assert "pools" in done.stdout and "swarm.tasks.inference" in done.stdout


async def test_asyncapi_prints_the_checked_in_document(amqp_url: str) -> None:
    done = await _swarm("asyncapi", amqp_url=amqp_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == CHECKED_IN_ASYNCAPI.read_text()
    assert json.loads(done.stdout)["asyncapi"] == "3.0.0"
