"""`backfill` and `swarm backfill` against the real daemon; the token bucket on a fake clock."""

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonFactory
from daemon_process import SWARM

from broker.daemon import Daemon
from broker.producer.backfill import (
    BackfillProgress,
    BackfillSummary,
    InvalidLine,
    backfill,
    default_errors_path,
    default_state_path,
    parse_line,
)
from broker.producer.client import SwarmClient
from broker.producer.ratelimit import TokenBucket
from schemas.task import TaskMessage

TYPES = ("training", "inference", "data_processing")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def task_lines(start: int, count: int) -> list[str]:
    """`count` echo tasks across the three types; every seventh carries its own id."""
    lines = []
    for n in range(start, start + count):
        task: dict[str, Any] = {"type": TYPES[n % 3], "handler": "echo", "args": {"n": n}}
        if n % 7 == 0:
            task["id"] = f"explicit-{n}"
        lines.append(json.dumps(task))
    return lines


def write(path: Path, lines: list[str], *, append: bool = False) -> Path:
    with path.open("a" if append else "w") as out:
        out.writelines(line + "\n" for line in lines)
    return path


def ids_of(path: Path) -> list[str]:
    tasks = [parse_line(line) for line in path.read_text().splitlines()]
    return [task.id for task in tasks if isinstance(task, TaskMessage)]


def recorded(source: Path) -> list[str]:
    """The ids in the state file (each line: the id, a tab, the reply's status)."""
    return [line.split("\t")[0] for line in default_state_path(source).read_text().splitlines()]


class Steps:
    """Every progress step of a run, and an event once `answered` reaches a count."""

    def __init__(self, answered_at: int | None = None) -> None:
        self.steps: list[BackfillProgress] = []
        self.answered_at = answered_at
        self.reached = asyncio.Event()

    def __call__(self, step: BackfillProgress) -> None:
        self.steps.append(step)
        if self.answered_at is not None and step.answered >= self.answered_at:
            self.reached.set()

    def ids(self, event: str) -> set[str]:
        return {s.task_id for s in self.steps if s.event == event and s.task_id is not None}


async def run(
    amqp_url: str,
    source: Path,
    *,
    rate_per_s: float | None = None,
    on_progress: Steps | None = None,
) -> BackfillSummary:
    async with SwarmClient(amqp_url) as client:
        return await backfill(
            client, source, state=None, rate_per_s=rate_per_s, window=16, on_progress=on_progress
        )


async def test_every_line_is_answered_and_recorded(
    daemon: Daemon, amqp_url: str, tmp_path: Path
) -> None:
    source = write(tmp_path / "tasks.jsonl", task_lines(0, 50))
    steps = Steps()
    summary = await run(amqp_url, source, on_progress=steps)
    assert (summary.lines, summary.sent, summary.ok, summary.skipped) == (50, 50, 50, 0)
    assert summary.errors == {} and summary.invalid == () and summary.missing == ()
    assert summary.complete
    assert sorted(recorded(source)) == sorted(ids_of(source))
    assert len(set(recorded(source))) == 50
    assert "explicit-7" in recorded(source)
    assert steps.steps[-1].finished == steps.steps[-1].total == 50
    assert not default_errors_path(source).exists()


async def test_rerun_after_appending_sends_only_the_new_lines(
    daemon: Daemon, amqp_url: str, tmp_path: Path
) -> None:
    source = write(tmp_path / "tasks.jsonl", task_lines(0, 50))
    first = await run(amqp_url, source)
    assert first.ok == 50
    write(source, task_lines(50, 10), append=True)
    steps = Steps()
    second = await run(amqp_url, source, on_progress=steps)
    assert (second.lines, second.sent, second.skipped, second.ok) == (60, 10, 50, 10)
    assert steps.ids("sent") == set(ids_of(source)[50:])
    assert len(recorded(source)) == len(set(recorded(source))) == 60


async def test_interrupted_run_resumes_without_resending_what_was_done(
    daemon: Daemon, amqp_url: str, tmp_path: Path
) -> None:
    source = write(tmp_path / "tasks.jsonl", task_lines(0, 50))
    first = Steps(answered_at=10)
    async with SwarmClient(amqp_url) as client:
        running = asyncio.create_task(
            backfill(client, source, state=None, rate_per_s=None, window=4, on_progress=first)
        )
        await asyncio.wait_for(first.reached.wait(), 60)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    done_first = first.ids("answered")
    assert set(recorded(source)) == done_first
    assert 10 <= len(done_first) < 50  # it really was cut short

    second = Steps()
    summary = await run(amqp_url, source, on_progress=second)
    assert summary.complete
    assert summary.skipped == len(done_first)
    assert summary.sent == 50 - len(done_first)
    assert second.ids("sent").isdisjoint(done_first)
    assert done_first | second.ids("answered") == set(ids_of(source))
    assert len(recorded(source)) == len(set(recorded(source))) == 50


async def test_bad_lines_are_reported_and_the_rest_still_runs(
    daemon: Daemon, amqp_url: str, tmp_path: Path
) -> None:
    good = task_lines(0, 5)
    lines = [
        good[0],
        good[1],
        '{"type": "inference", "handler": "echo", "args": ',  # line 3: not JSON
        good[2],
        "",  # blank: not a task, not counted
        '{"type": "inference", "handler": "echo", "colour": "red"}',  # line 6: unknown key
        good[3],
        '{"type": "training", "handler": "fail", "args": {"message": "on purpose"}}',
        good[4],
    ]
    source = write(tmp_path / "mixed.jsonl", lines)
    summary = await run(amqp_url, source)
    assert [i.line for i in summary.invalid] == [3, 6]
    assert summary.invalid[0].reason.startswith("not JSON")
    assert summary.invalid[1] == InvalidLine(6, "unknown key 'colour'")
    assert (summary.lines, summary.sent, summary.ok) == (8, 6, 5)
    # An error reply is a final outcome: recorded as done, and detailed in the errors file.
    assert summary.errors == {"handler_error": 1}
    assert not summary.complete
    assert len(recorded(source)) == 6
    records = [json.loads(r) for r in default_errors_path(source).read_text().splitlines()]
    by_line = {r["line"]: r for r in records}
    assert set(by_line) == {3, 6, 8}
    assert by_line[3]["kind"] == by_line[6]["kind"] == "invalid_line"
    assert by_line[6]["text"] == lines[5]
    assert by_line[8]["kind"] == "reply" and by_line[8]["code"] == "handler_error"
    assert by_line[8]["id"] in recorded(source)


async def test_replies_that_never_come_are_missing_not_done(amqp_url: str, tmp_path: Path) -> None:
    """No daemon consumes: past the reply wait each task is `missing`, left out of the state
    file (the next run sends it again), and the CLI exits 1."""
    source = write(tmp_path / "tasks.jsonl", task_lines(0, 3))
    async with SwarmClient(amqp_url) as client:
        summary = await backfill(
            client,
            source,
            state=None,
            rate_per_s=None,
            window=8,
            on_progress=None,
            reply_timeout_s=0.5,
        )
    assert (summary.sent, summary.ok, len(summary.missing)) == (3, 0, 3)
    assert not summary.complete
    assert not default_state_path(source).exists()
    records = [json.loads(r) for r in default_errors_path(source).read_text().splitlines()]
    assert [r["kind"] for r in records] == ["no_reply"] * 3
    done = await swarm("backfill", str(source), "--wait", "0.5", amqp_url=amqp_url)
    assert done.returncode == 1, done.stderr
    assert count(done.stdout, "no reply") == 3


def test_line_ids_are_stable_and_content_derived() -> None:
    spaced = parse_line('{ "handler": "echo", "type": "inference",  "args": [1, 2] }')
    compact = parse_line('{"type":"inference","handler":"echo","args":[1,2]}')
    other = parse_line('{"type":"inference","handler":"echo","args":[2,1]}')
    assert isinstance(spaced, TaskMessage) and isinstance(compact, TaskMessage)
    assert isinstance(other, TaskMessage)
    assert spaced.id == compact.id != other.id
    assert re.fullmatch(r"bf-[0-9a-f]{32}", compact.id)
    assert parse_line("[1, 2]") == "not a JSON object but list"
    assert parse_line('{"type": "inference", "handler": "echo", "priority": 12}') == (
        "priority: Input should be less than or equal to 9"
    )


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now_s += seconds


def test_token_bucket_accounting() -> None:
    clock = FakeClock()
    bucket = TokenBucket(20, clock=clock)
    # One token to start with, then each one costs 1/20 s more than the one before.
    assert [bucket.reserve() for _ in range(4)] == pytest.approx([0.0, 0.05, 0.10, 0.15])
    assert bucket.tokens == pytest.approx(-3)
    clock.now_s += 0.15  # the debt is paid off...
    assert bucket.tokens == pytest.approx(0)
    clock.now_s += 10.0  # ...and idle time saves up no more than the burst
    assert bucket.tokens == pytest.approx(1)
    assert bucket.reserve() == 0.0
    assert bucket.reserve() == pytest.approx(0.05)
    with pytest.raises(ValueError):
        TokenBucket(0)


async def test_token_bucket_paces_ten_acquisitions_at_twenty_per_second() -> None:
    clock = FakeClock()
    bucket = TokenBucket(20, clock=clock, sleep=clock.sleep)
    start_s = clock()
    for _ in range(10):
        await bucket.acquire()
    # The first goes at once, the other nine 1/20 s apart: one sleep each, no polling.
    assert clock() - start_s == pytest.approx(9 / 20)
    assert clock.slept == pytest.approx([0.05] * 9)


async def test_rate_limited_backfill_summary(daemon: Daemon, amqp_url: str, tmp_path: Path) -> None:
    source = write(tmp_path / "tasks.jsonl", task_lines(0, 10))
    summary = await run(amqp_url, source, rate_per_s=20.0)
    assert (summary.sent, summary.ok) == (10, 10)
    assert summary.rate_per_s == pytest.approx(10 / summary.elapsed_s)


async def swarm(*args: str, amqp_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AMQP_URL": amqp_url}
    process = await asyncio.create_subprocess_exec(
        SWARM, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


def count(output: str, label: str) -> int:
    found = re.search(rf"(?<!\w){re.escape(label)}\W+(\d+)", output)
    assert found is not None, output
    return int(found.group(1))


async def test_cli_backfill_end_to_end(daemon: Daemon, amqp_url: str, tmp_path: Path) -> None:
    source = write(tmp_path / "tasks.jsonl", task_lines(0, 12))
    done = await swarm("backfill", str(source), "--window", "8", amqp_url=amqp_url)
    assert done.returncode == 0, done.stderr
    assert count(done.stdout, "sent") == 12
    assert count(done.stdout, "ok") == 12
    assert count(done.stdout, "skipped (already done)") == 0
    assert len(recorded(source)) == 12

    write(source, ["not json"], append=True)
    again = await swarm("backfill", str(source), "--rate", "50", amqp_url=amqp_url)
    assert again.returncode == 1, again.stderr
    assert count(again.stdout, "sent") == 0
    assert count(again.stdout, "skipped (already done)") == 12
    assert count(again.stdout, "invalid lines") == 1
    assert "line 13: not JSON" in again.stdout


async def test_retry_errors_runs_the_failed_lines_again_and_never_an_ok_one(
    start_daemon: DaemonFactory, amqp_url: str, tmp_path: Path
) -> None:
    await start_daemon(handler_modules=["workers.diagnostics"])
    journal = tmp_path / "ok-runs"
    lines = [
        # Fail their first run (no retries), succeed from the second: "fixed" by then.
        *(
            json.dumps(
                {
                    "id": f"flaky-{n}",
                    "type": "data_processing",
                    "handler": "flaky",
                    "args": {"path": str(tmp_path / f"flaky-{n}"), "failures": 1},
                    "max_retries": 0,
                }
            )
            for n in range(3)
        ),
        *(
            json.dumps(
                {
                    "id": f"ok-{n}",
                    "type": "data_processing",
                    "handler": "journal",
                    "args": {"path": str(journal), "entry": f"ok-{n}"},
                }
            )
            for n in range(2)
        ),
    ]
    source = write(tmp_path / "tasks.jsonl", lines)
    first = await swarm("backfill", str(source), amqp_url=amqp_url)
    assert first.returncode == 0, first.stderr  # error replies are final outcomes
    assert (count(first.stdout, "ok"), count(first.stdout, "handler_error")) == (2, 3)

    plain = await swarm("backfill", str(source), amqp_url=amqp_url)
    assert count(plain.stdout, "sent") == 0 and count(plain.stdout, "skipped (already done)") == 5

    retried = await swarm("backfill", str(source), "--retry-errors", amqp_url=amqp_url)
    assert retried.returncode == 0, retried.stderr
    assert (count(retried.stdout, "sent"), count(retried.stdout, "ok")) == (3, 3)
    assert count(retried.stdout, "skipped (already done)") == 2
    for n in range(3):  # ran twice: the error, then the replay
        assert (tmp_path / f"flaky-{n}").read_text().count("run") == 2
    assert journal.read_text().split() == ["ok-0", "ok-1"]  # never run again

    again = await swarm("backfill", str(source), "--retry-errors", amqp_url=amqp_url)
    assert count(again.stdout, "sent") == 0 and count(again.stdout, "skipped (already done)") == 5


async def test_cli_backfill_unreachable_rabbitmq_exits_2(tmp_path: Path) -> None:
    source = write(tmp_path / "tasks.jsonl", task_lines(0, 1))
    url = "amqp://guest:secret@127.0.0.1:1/"
    done = await swarm("backfill", str(source), "--amqp-url", url, amqp_url=url)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("swarm: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/")
    assert "Traceback" not in done.stderr
    assert "secret" not in done.stderr + done.stdout


async def test_example_script_runs_the_sample_file(
    daemon: Daemon, amqp_url: str, tmp_path: Path
) -> None:
    sample = tmp_path / "sample.jsonl"
    sample.write_text((EXAMPLES / "backfill-sample.jsonl").read_text())
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "backfill.py"),
        str(sample),
        env={**os.environ, "AMQP_URL": amqp_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    assert "sent 20, skipped 0 (already done), ok 20," in out.decode()
    assert len(recorded(sample)) == 20
