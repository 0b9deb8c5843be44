"""The wire models: task, control requests, reply, and the exported JSON Schema. Pure."""

import json
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.codec import decode, encode
from schemas.control import CancelRequest, StatusRequest, parse_control
from schemas.jsonschema import wire_schema
from schemas.reply import ErrorInfo, Reply, Timing
from schemas.task import Resources, TaskMessage

MINIMAL: dict[str, Any] = {"v": 1, "id": "task-1", "type": "training", "handler": "echo"}


def task(**changes: Any) -> TaskMessage:
    """Validate MINIMAL with `changes`, as the daemon does: from a decoded msgpack body."""
    return TaskMessage.model_validate(decode(encode({**MINIMAL, **changes})))


def rejected(**changes: Any) -> list[Any]:
    with pytest.raises(ValidationError) as info:
        task(**changes)
    return info.value.errors()


# -- task: what is accepted --------------------------------------------------------------------


def test_minimal_task_takes_the_defaults() -> None:
    message = task()
    assert message.v == 1
    assert message.id == "task-1"
    assert message.type == "training"
    assert message.handler == "echo"
    assert message.args is None
    assert message.resources is None
    assert message.pool is None
    assert message.priority is None  # absent: the scheduler reads it as 0
    assert message.deadline is None
    assert message.timeout_s is None
    assert message.max_retries is None


def test_full_task() -> None:
    message = task(
        type="data_processing",
        args={"x": [1, 2], "blob": b"\x00"},
        resources={"cpus": 0.5, "gpus": 1, "memory_mb": 512},
        pool="memory",
        priority=9,
        deadline=1_700_000_000.5,
        timeout_s=2.5,
        max_retries=20,
    )
    assert message.args == {"x": [1, 2], "blob": b"\x00"}
    assert message.resources == Resources(cpus=0.5, gpus=1.0, memory_mb=512)
    assert message.pool == "memory"
    assert message.priority == 9
    assert message.deadline == 1_700_000_000.5
    assert message.timeout_s == 2.5
    assert message.max_retries == 20


@pytest.mark.parametrize("task_type", ["training", "inference", "data_processing"])
def test_every_task_type(task_type: str) -> None:
    assert task(type=task_type).type == task_type


@pytest.mark.parametrize("pool", ["gpu", "cpu", "memory"])
def test_every_pool(pool: str) -> None:
    assert task(pool=pool).pool == pool


@pytest.mark.parametrize(
    "key", ["args", "resources", "pool", "deadline", "timeout_s", "max_retries"]
)
def test_optional_key_given_as_nil_counts_as_absent(key: str) -> None:
    assert task(**{key: None}) == task()


def test_priority_given_as_nil_counts_as_absent() -> None:
    assert task(priority=None) == task()


def test_resource_keys_given_as_nil_count_as_absent() -> None:
    message = task(resources={"cpus": None, "gpus": None, "memory_mb": None})
    assert message.resources == Resources()
    assert task(resources={}).resources == Resources()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("deadline", 1_700_000_000),
        ("timeout_s", 5),
        ("resources", {"cpus": 2}),
        ("resources", {"gpus": 1}),
    ],
)
def test_int_is_accepted_where_a_number_is_asked(key: str, value: Any) -> None:
    message = task(**{key: value})
    got = getattr(message, key)
    if key == "resources":
        ((name, number),) = value.items()
        got, value = getattr(got, name), number
    assert got == value


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("id", "x"),
        ("id", "x" * 128),
        ("priority", 0),
        ("priority", 9),
        ("max_retries", 0),
        ("max_retries", 20),
        ("timeout_s", 1e-9),
        ("resources", {"cpus": 0, "gpus": 0.0, "memory_mb": 0}),
    ],
)
def test_range_bounds_are_accepted(key: str, value: Any) -> None:
    task(**{key: value})


# -- task: what is rejected --------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["v", "id", "type", "handler"])
def test_required_keys(missing: str) -> None:
    body = {k: v for k, v in MINIMAL.items() if k != missing}
    with pytest.raises(ValidationError) as info:
        TaskMessage.model_validate(body)
    assert info.value.errors()[0]["loc"] == (missing,)


def test_unknown_top_level_key_is_rejected() -> None:
    errors = rejected(colour="blue")
    assert errors[0]["type"] == "extra_forbidden"
    assert errors[0]["loc"] == ("colour",)


def test_unknown_resources_key_is_rejected() -> None:
    errors = rejected(resources={"cpus": 1, "tpus": 4})
    assert errors[0]["type"] == "extra_forbidden"
    assert errors[0]["loc"] == ("resources", "tpus")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        # strict types: no coercion from strings, bools or floats
        ("v", "1"),
        ("v", 2),
        ("v", 0),
        ("id", 17),
        ("id", b"task-1"),
        ("type", "Training"),
        ("type", "gpu"),
        ("handler", 3),
        ("handler", ""),
        ("priority", True),
        ("priority", 1.0),
        ("priority", "1"),
        ("max_retries", True),
        ("max_retries", 2.0),
        ("deadline", True),
        ("deadline", "tomorrow"),
        ("timeout_s", True),
        ("timeout_s", "5"),
        ("resources", {"cpus": True}),
        ("resources", {"cpus": "1"}),
        ("resources", {"gpus": False}),
        ("resources", {"memory_mb": 1.5}),
        ("resources", {"memory_mb": 512.0}),
        ("resources", {"memory_mb": True}),
        ("resources", {"memory_mb": "512"}),
        ("resources", [1, 0, 512]),
        ("resources", "cpu"),
        ("pool", "GPU"),
        ("pool", "tpu"),
        ("pool", 1),
        # ranges
        ("id", ""),
        ("id", "x" * 129),
        ("priority", -1),
        ("priority", 10),
        ("max_retries", -1),
        ("max_retries", 21),
        ("timeout_s", 0),
        ("timeout_s", -1.5),
        ("timeout_s", float("nan")),
        ("resources", {"cpus": -0.5}),
        ("resources", {"gpus": -1}),
        ("resources", {"memory_mb": -1}),
        ("resources", {"cpus": float("nan")}),
    ],
)
def test_bad_values_are_rejected(key: str, value: Any) -> None:
    errors = rejected(**{key: value})
    assert errors[0]["loc"][0] == key


@pytest.mark.parametrize("value", [True, 1.0])
def test_version_must_be_the_int_1(value: Any) -> None:
    rejected(v=value)


def test_body_that_is_not_a_map_is_rejected() -> None:
    for body in ([1, "a", "training", "echo"], "task", None, 1):
        with pytest.raises(ValidationError):
            TaskMessage.model_validate(body)


# -- frozen ------------------------------------------------------------------------------------


def test_task_is_frozen() -> None:
    message = task(resources={"cpus": 1})
    with pytest.raises(ValidationError):
        message.priority = 5  # type: ignore[misc]
    assert message.resources is not None
    with pytest.raises(ValidationError):
        message.resources.cpus = 4  # type: ignore[misc]
    assert message.priority is None
    assert message.resources.cpus == 1


def test_reply_is_frozen() -> None:
    reply = Reply(id="t", status="ok")
    with pytest.raises(ValidationError):
        reply.status = "error"  # type: ignore[misc]


# -- control -----------------------------------------------------------------------------------


def test_status_request() -> None:
    request = parse_control(decode(encode({"v": 1, "op": "status"})))
    assert isinstance(request, StatusRequest)


def test_cancel_request() -> None:
    request = parse_control(decode(encode({"v": 1, "op": "cancel", "id": "task-9"})))
    assert isinstance(request, CancelRequest)
    assert request.id == "task-9"


@pytest.mark.parametrize(
    "payload",
    [
        {"v": 1, "op": "cancel"},
        {"v": 1, "op": "cancel", "id": ""},
        {"v": 1, "op": "cancel", "id": "x" * 129},
        {"v": 1, "op": "cancel", "id": 5},
        {"v": 1, "op": "status", "id": "task-1"},
        {"v": 1, "op": "status", "verbose": True},
        {"v": 1, "op": "restart"},
        {"v": 1, "op": "STATUS"},
        {"v": 1},
        {"op": "status"},
        {"v": 2, "op": "status"},
        {"v": "1", "op": "status"},
        {},
        [1, "status"],
        "status",
        None,
    ],
)
def test_bad_control_requests_raise_validation_error(payload: Any) -> None:
    with pytest.raises(ValidationError):
        parse_control(payload)


# -- reply -------------------------------------------------------------------------------------


def test_reply_wire_dict_has_every_key() -> None:
    wire = Reply(id="t-1", status="ok", result={"a": 1}, attempts=1).wire_dict()
    assert wire == {
        "v": 1,
        "id": "t-1",
        "status": "ok",
        "result": {"a": 1},
        "error": None,
        "attempts": 1,
        "pool": None,
        "node": None,
        "timing": {"queued_ms": 0.0, "run_ms": 0.0},
    }


def test_error_reply_round_trips_through_the_codec() -> None:
    reply = Reply(
        id=None,
        status="error",
        error=ErrorInfo(code="malformed", message="not msgpack", retryable=False),
        attempts=0,
        pool="cpu",
        node="ab12",
        timing=Timing(queued_ms=1.5, run_ms=0),
    )
    back = Reply.model_validate(decode(encode(reply.wire_dict())))
    assert back == reply
    assert back.error is not None and back.error.code == "malformed"


@pytest.mark.parametrize(
    "changes",
    [
        {"status": "done"},
        {"error": {"code": "oops", "message": "x"}},
        {"error": {"code": "invalid", "message": "x", "extra": 1}},
        {"attempts": -1},
        {"v": 2},
        {"surprise": 1},
    ],
)
def test_bad_replies_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Reply.model_validate({"id": "t", "status": "ok", **changes})


def test_reply_requires_id_even_when_nil() -> None:
    with pytest.raises(ValidationError):
        Reply.model_validate({"status": "ok"})
    assert Reply.model_validate({"id": None, "status": "ok"}).id is None


# -- JSON Schema -------------------------------------------------------------------------------


def test_wire_schema_has_task_reply_and_control() -> None:
    schema = wire_schema()
    assert {"task", "reply", "control"} <= schema.keys()
    json.dumps(schema)  # serialisable as it is


def test_task_schema_is_closed_and_requires_the_four_keys() -> None:
    task_schema = wire_schema()["task"]
    assert task_schema["additionalProperties"] is False
    assert set(task_schema["required"]) == {"v", "id", "type", "handler"}
    assert task_schema["$defs"]["Resources"]["additionalProperties"] is False
    props = task_schema["properties"]
    priority = next(branch for branch in props["priority"]["anyOf"] if branch["type"] == "integer")
    assert priority["minimum"] == 0 and priority["maximum"] == 9
    assert props["id"]["minLength"] == 1 and props["id"]["maxLength"] == 128
    assert set(props["type"]["enum"]) == {"training", "inference", "data_processing"}


def test_control_schema_covers_every_op() -> None:
    control = wire_schema()["control"]
    assert set(control["$defs"]) == {"StatusRequest", "CancelRequest", "TaskRequest"}
    assert all(d["additionalProperties"] is False for d in control["$defs"].values())
    assert control["discriminator"]["propertyName"] == "op"


def test_reply_schema_is_closed() -> None:
    reply = wire_schema()["reply"]
    assert reply["additionalProperties"] is False
    assert {"v", "id", "status", "result", "error", "attempts", "pool", "node", "timing"} == set(
        reply["properties"]
    )
