"""The `swarm` command as a user runs it."""

import asyncio
import json
import os
import subprocess
import time
import urllib.parse
from pathlib import Path

import aio_pika
import aiormq
import msgpack
import pytest
from conftest import DaemonFactory, until_journaled
from daemon_process import SWARM
from rabbit import RabbitServer
from raw import Inbox

from broker.amqp.urls import redact
from broker.daemon import Daemon

CHECKED_IN_ASYNCAPI = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.json"
DIAGNOSTICS = ["workers.diagnostics"]
# A broker nothing listens on: a command that tried to connect would exit 1, "cannot reach".
NOWHERE = "amqp://guest:guest@127.0.0.1:1/"


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


async def _reply_queues(rabbit: RabbitServer, amqp_url: str) -> list[str]:
    """The `swarm.reply.*` queues of the test's vhost, as RabbitMQ lists them."""
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path[1:])
    listed = await asyncio.to_thread(
        rabbit.rabbitmqctl, "list_queues", "-p", vhost, "name", "--quiet", "--no-table-headers"
    )
    return [name for name in listed.split() if name.startswith("swarm.reply.")]


async def test_submit_error_reply_exits_3(daemon: Daemon, amqp_url: str) -> None:
    done = await _swarm(
        "submit", "inference", "fail", "--args", '{"message": "no"}', amqp_url=amqp_url
    )
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout)["error"]["code"] == "handler_error"


async def test_submit_puts_every_option_on_the_wire_and_a_timeout_names_the_task(
    amqp_url: str,
) -> None:
    """No daemon: the task waits in its queue, exactly as the options made it, and the
    command's timeout says which task and that no daemon reads the queue."""
    before = time.time()
    done = await _swarm(
        "submit", "inference", "echo", "--args", '{"x": 1}', "--id", "cli-options",
        "--deadline-in", "600", "--timeout", "5", "--resources", "cpus=0.5,memory_mb=64",
        "--retries", "3", "--priority", "7", "--pool", "cpu", "--wait", "1",
        amqp_url=amqp_url,
    )  # fmt: skip
    after = time.time()
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[0] == (
        "swarm: no reply for task cli-options within 1 s; "
        "no daemon consumes swarm.tasks.inference (is `swarm run` up?)"
    )
    assert "swarm cancel cli-options" in done.stderr
    assert "Traceback" not in done.stderr
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        # basic.get is refused on a single-active-consumer quorum queue: consume it.
        queue = await channel.get_queue("swarm.tasks.inference", ensure=False)
        message = (await (await Inbox(queue).start()).one()).message
        body = msgpack.unpackb(message.body)
        deadline = body.pop("deadline")
        assert before + 600 <= deadline <= after + 600
        assert body == {
            "v": 1,
            "id": "cli-options",
            "type": "inference",
            "handler": "echo",
            "args": {"x": 1},
            "resources": {"cpus": 0.5, "memory_mb": 64},
            "pool": "cpu",
            "priority": 7,
            "timeout_s": 5.0,
            "max_retries": 3,
        }
        assert message.message_id == "cli-options"
        # The command deleted its reply queue on the way out, though no reply came.
        assert message.reply_to is not None and message.reply_to.startswith("swarm.reply.")
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(message.reply_to, passive=True)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["inference", "echo", "--priority", "12"], "swarm: --priority: "),
        (["inference", "echo", "--pool", "bogus"], "swarm: --pool: "),
        (["quantum", "echo"], "swarm: TYPE: "),
        (["inference", "echo", "--resources", "gpu=1"], "swarm: --resources: unknown key 'gpu'"),
        (["inference", "echo", "--resources", "cpus=-1"], "swarm: --resources cpus: "),
        (["inference", "echo", "--retries", "21"], "swarm: --retries: "),
        (["inference", "echo", "--timeout", "0"], "swarm: --timeout: "),
        (["inference", "echo", "--deadline", "soon"], "swarm: --deadline 'soon' is neither"),
        (["inference", "echo", "--deadline", "1", "--deadline-in", "5"], "swarm: --deadline and"),
        (["inference", "echo", "--id", ""], "swarm: --id: "),
        (["inference", "echo", "--args", "{nope"], "swarm: --args is not JSON"),
        (["inference", "echo", "--wait", "0"], "swarm: --wait must be"),
    ],
)
async def test_submit_checks_the_task_before_connecting(options: list[str], said: str) -> None:
    done = await _swarm("submit", *options, amqp_url=NOWHERE)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(said)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot reach" not in done.stderr  # never connected: nothing was sent
    assert done.stdout == ""


async def test_submit_options_reach_the_daemon(start_daemon: DaemonFactory, amqp_url: str) -> None:
    await start_daemon()
    limited = await _swarm(
        "submit", "training", "sleep", "--args", '{"seconds": 60}', "--id", "cli-limited",
        "--timeout", "0.5", amqp_url=amqp_url,
    )  # fmt: skip
    assert limited.returncode == 3, limited.stderr
    reply = json.loads(limited.stdout)
    assert (reply["id"], reply["status"], reply["error"]["code"]) == (
        "cli-limited",
        "error",
        "timeout",
    )
    expired = await _swarm(
        "submit", "inference", "echo", "--deadline", "2001-09-09T01:46:40+00:00",
        amqp_url=amqp_url,
    )  # fmt: skip
    assert expired.returncode == 3, expired.stderr
    assert json.loads(expired.stdout)["status"] == "expired"
    unplaceable = await _swarm(
        "submit", "inference", "echo", "--resources", '{"gpus": 1000}', amqp_url=amqp_url
    )
    assert unplaceable.returncode == 3, unplaceable.stderr
    assert json.loads(unplaceable.stdout)["error"]["code"] == "unsatisfiable"


async def test_submit_progress_prints_each_message_then_the_reply(
    start_daemon: DaemonFactory, amqp_url: str
) -> None:
    await start_daemon(handler_modules=DIAGNOSTICS)
    done = await _swarm(
        "submit", "training", "steps", "--args", '{"steps": 3}', "--id", "cli-progress",
        "--progress", amqp_url=amqp_url,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    progress = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(p["id"], p["seq"], p["progress"]) for p in progress] == [
        ("cli-progress", step, {"step": step, "of": 3}) for step in (1, 2, 3)
    ]
    assert json.loads(done.stdout)["result"] == {"done": 3}


async def test_cancel_a_running_task_then_too_late_then_one_not_sent_yet(
    start_daemon: DaemonFactory, amqp_url: str, tmp_path: Path
) -> None:
    await start_daemon(handler_modules=DIAGNOSTICS)
    journal = tmp_path / "runs"
    args = json.dumps({"path": str(tmp_path / "never"), "journal": str(journal)})
    submitted = asyncio.create_task(
        _swarm("submit", "training", "wait_file", "--args", args, "--id", "cli-long",
               amqp_url=amqp_url)
    )  # fmt: skip
    await until_journaled(journal, 1)  # the handler began: certainly running
    cancelled = await _swarm("cancel", "cli-long", amqp_url=amqp_url)
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout) == {"id": "cli-long", "state": "running"}
    done = await submitted
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout)["status"] == "cancelled"

    too_late = await _swarm("cancel", "cli-long", amqp_url=amqp_url)
    assert too_late.returncode == 3, too_late.stderr
    # The reply may come before its outcome is recorded: "finishing" is too late as well.
    assert json.loads(too_late.stdout) in (
        {"id": "cli-long", "state": "finished", "status": "cancelled"},
        {"id": "cli-long", "state": "finishing"},
    )
    ahead = await _swarm("cancel", "cli-not-sent-yet", amqp_url=amqp_url)
    assert ahead.returncode == 0, ahead.stderr
    assert json.loads(ahead.stdout)["state"] == "unseen"


async def test_cancel_without_a_daemon_says_so(amqp_url: str) -> None:
    done = await _swarm("cancel", "cli-any", "--wait", "1", amqp_url=amqp_url)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "swarm: no reply for the request on swarm.control within 1 s; "
        "no daemon consumes swarm.control (is `swarm run` up?)"
    )


async def test_commands_leave_no_reply_queue_behind(
    daemon: Daemon, amqp_url: str, rabbit: RabbitServer
) -> None:
    for command in (
        ["submit", "inference", "echo"],
        ["submit", "inference", "fail"],
        ["status", "--json"],
        ["status", "--watch", "--interval", "0.1", "--count", "2"],
        ["cancel", "cli-no-such-task"],
    ):
        done = await _swarm(*command, amqp_url=amqp_url)
        assert done.returncode in (0, 3), done.stderr
        assert await _reply_queues(rabbit, amqp_url) == [], command


@pytest.mark.parametrize("command", ["submit", "cancel", "status"])
async def test_help_gives_the_exit_statuses(command: str) -> None:
    done = await _swarm(command, "--help", amqp_url=NOWHERE, COLUMNS="200")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "Exit status: 0 " in text
    for status in ("1 ", "2 "):
        assert f"; {status}" in text, text


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
