"""`swarm submit`'s options read into a task and checked before anything is sent."""

from datetime import datetime, timezone

import pytest

from broker.cli.submit_options import OptionError, build_task, parse_deadline, parse_resources


def test_a_deadline_is_iso_8601_or_unix_seconds_or_seconds_from_now() -> None:
    assert parse_deadline("1700000000.5", None, now=0) == 1700000000.5
    moment = datetime(2030, 1, 31, 12, tzinfo=timezone.utc)
    assert parse_deadline("2030-01-31T12:00:00+00:00", None, now=0) == moment.timestamp()
    assert parse_deadline("2030-01-31T12:00:00Z", None, now=0) == moment.timestamp()
    assert parse_deadline(None, 30, now=100.0) == 130.0
    assert parse_deadline(None, None, now=100.0) is None
    for deadline, within in (("nan", None), ("later", None), (None, 0.0), ("1", 5.0)):
        with pytest.raises(OptionError, match="--deadline"):
            parse_deadline(deadline, within, now=0)


def test_resources_are_key_value_pairs_or_json() -> None:
    assert parse_resources("cpus=2, gpus=0.5,memory_mb=4096") == {
        "cpus": 2,
        "gpus": 0.5,
        "memory_mb": 4096,
    }
    assert parse_resources('{"gpus": 1}') == {"gpus": 1}
    assert parse_resources(None) is None
    for bad in ("cpus", "cpus=two", "", "[1]", "{nope"):
        with pytest.raises(OptionError, match="--resources"):
            parse_resources(bad)


def test_every_invalid_value_names_its_option() -> None:
    with pytest.raises(OptionError) as caught:
        build_task(
            "quantum",
            "",
            None,
            task_id="x" * 129,
            resources={"cpus": -1, "disks": 1},
            pool="bogus",
            priority=12,
            timeout_s=0,
            max_retries=21,
        )
    lines = str(caught.value).splitlines()
    starts = sorted(line.split(":")[0] for line in lines)
    assert starts == sorted(
        [
            "TYPE",
            "HANDLER",
            "--id",
            "--resources cpus",
            "--resources",
            "--pool",
            "--priority",
            "--timeout",
            "--retries",
        ]
    )
    assert "--resources: unknown key 'disks' (cpus, gpus, memory_mb)" in lines


def test_a_valid_task_gets_an_id_and_keeps_its_values() -> None:
    task = build_task("inference", "echo", {"x": 1}, priority=0, resources={"cpus": 1})
    assert len(task.id) == 32
    assert (task.priority, task.resources and task.resources.cpus) == (0, 1)
