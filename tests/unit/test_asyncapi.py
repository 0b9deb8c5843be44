"""The AsyncAPI document of the wire contract (docs/asyncapi.json): current, self-contained, shaped
as AsyncAPI 3.0.0 (checked with the official JSON Schema where npm is installed), and its schemas
accept what the pydantic models accept."""

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator  # installed with Ray; AsyncAPI schemas are draft-07
from pydantic import TypeAdapter, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

import broker.amqp.publisher
import broker.amqp.topology
import broker.ops.control
from schemas import asyncapi
from schemas.control import ControlRequest
from schemas.progress import ProgressMessage
from schemas.reply import ErrorInfo, Reply, Timing
from schemas.task import TaskMessage
from schemas.topology import (
    ATTEMPTS_HEADER,
    CONTENT_TYPE,
    DEAD_LETTERED_AT_HEADER,
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    ORIGINAL_USER_HEADER,
    PROGRESS_HEADER,
    REPLAY_HEADER,
    SOURCE_QUEUE_HEADER,
    STATUS_HEADER,
    TASK_TYPES,
    TRACEBACK_HEADER,
    TRUNCATED_HEADER,
    UNDELIVERED_REPLY_HEADER,
)

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "docs" / "asyncapi.json"
REGENERATE = ".venv/bin/python -m schemas.asyncapi > docs/asyncapi.json"
SPECS = ROOT / "tests" / "asyncapi"
NPM_TIMEOUT_S = 240.0
URI = "urn:swarm:asyncapi"

# The contract's topology table (PROTOCOL.md), written out here on purpose: the document must
# agree with the contract, not merely with the constants it was built from.
CONTRACT_QUEUES = [
    "swarm.tasks.training",
    "swarm.tasks.inference",
    "swarm.tasks.data_processing",
    "swarm.dead",
    "swarm.control",
]
CONTRACT_EXCHANGES = {"swarm.tasks": "direct", "swarm.dead": "fanout", "swarm.results": "topic"}

GOOD_TASK: dict[str, Any] = {
    "v": 1,
    "id": "t-1",
    "type": "training",
    "handler": "fit",
    "args": {"epochs": 3, "rows": [[1.0, 2.0]]},
    "resources": {"cpus": 2, "gpus": 0.5, "memory_mb": 1024},
    "pool": "gpu",
    "priority": 9,
    "deadline": 1_900_000_000.5,
    "timeout_s": 60,
    "max_retries": 2,
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return asyncapi.asyncapi_document()


def payload_validator(document: dict[str, Any], message: str) -> Draft7Validator:
    """The message's payload schema, with `#/components/...` resolved inside the document."""
    registry: Registry[Any] = Registry().with_resource(
        URI, Resource(document, specification=DRAFT7)
    )
    ref = f"{URI}#/components/messages/{message}/payload"
    return Draft7Validator({"$ref": ref}, registry=registry)


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} does not point inside the document"
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def model_accepts(model: Any, body: dict[str, Any]) -> bool:
    adapter = TypeAdapter(model)
    try:
        adapter.validate_python(body)
    except ValidationError:
        return False
    return True


# (a) the checked-in rendering is current


def test_checked_in_document_is_current() -> None:
    assert CHECKED_IN.exists(), f"docs/asyncapi.json is missing: `{REGENERATE}`"
    assert CHECKED_IN.read_text() == asyncapi.render(), (
        f"docs/asyncapi.json is out of date with schemas/: regenerate it with `{REGENERATE}`"
    )


def test_module_prints_the_rendering() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "schemas.asyncapi"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout == asyncapi.render()
    assert done.stdout.endswith("}\n")


# (b) every $ref resolves inside the document


def test_every_ref_resolves_inside_the_document(document: dict[str, Any]) -> None:
    found = list(refs(document))
    assert len(found) > 30
    for ref in found:
        assert resolve(document, ref) is not None, ref
    assert "$defs" not in json.dumps(document)
    for ref in refs(document["components"]["schemas"]):
        assert ref.startswith("#/components/schemas/"), ref


def test_models_own_the_payload_schemas(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert schemas["TaskMessage"]["properties"].keys() == TaskMessage.model_fields.keys()
    assert schemas["Reply"]["properties"].keys() == Reply.model_fields.keys()
    assert schemas["ProgressMessage"]["properties"].keys() == ProgressMessage.model_fields.keys()
    messages = document["components"]["messages"]
    assert messages["Task"]["payload"] == {"$ref": "#/components/schemas/TaskMessage"}
    assert messages["Reply"]["payload"] == {"$ref": "#/components/schemas/Reply"}
    assert messages["Progress"]["payload"] == {"$ref": "#/components/schemas/ProgressMessage"}
    assert messages["ControlRequest"]["payload"] == {"$ref": "#/components/schemas/ControlRequest"}


# (c) the payload schemas accept and reject what the models do


def test_task_payload_accepts_a_good_task(document: dict[str, Any]) -> None:
    TaskMessage.model_validate(GOOD_TASK)
    payload_validator(document, "Task").validate(GOOD_TASK)
    # The fewest keys, and optional ones given as nil (which counts as absent).
    smallest = {"v": 1, "id": "x", "type": "inference", "handler": "echo"}
    TaskMessage.model_validate(smallest | {"pool": None, "resources": None})
    payload_validator(document, "Task").validate(smallest | {"pool": None, "resources": None})


@pytest.mark.parametrize(
    "change",
    [
        {"colour": "blue"},  # an unknown key
        {"resources": {"cpus": 1, "tpus": 1}},  # an unknown key, one level down
        {"v": 2},
        {"id": ""},
        {"type": "video"},
        {"pool": "tpu"},
        {"priority": 10},
        {"timeout_s": 0},
        {"max_retries": 21},
        {"resources": {"gpus": -1}},
        {"handler": 7},
    ],
)
def test_task_payload_rejects_what_the_model_rejects(
    document: dict[str, Any], change: dict[str, Any]
) -> None:
    body = GOOD_TASK | change
    assert not model_accepts(TaskMessage, body)
    assert not payload_validator(document, "Task").is_valid(body), body


def test_task_payload_requires_what_the_model_requires(document: dict[str, Any]) -> None:
    for key in ("v", "id", "type", "handler"):
        body = {name: value for name, value in GOOD_TASK.items() if name != key}
        assert not model_accepts(TaskMessage, body)
        assert not payload_validator(document, "Task").is_valid(body), key


def test_reply_payload_accepts_every_reply_the_daemon_writes(document: dict[str, Any]) -> None:
    validator = payload_validator(document, "Reply")
    replies = [
        Reply(id="t-1", status="ok", result={"loss": 0.1}, attempts=1, pool="gpu", node="ab12"),
        Reply(
            id="t-2",
            status="error",
            error=ErrorInfo(code="worker_lost", message="actor died", retryable=True),
            attempts=4,
            timing=Timing(queued_ms=3.5, run_ms=120.0),
        ),
        Reply(id=None, status="error", error=ErrorInfo(code="malformed", message="not a map")),
        Reply(id="t-3", status="cancelled", error=ErrorInfo(code="cancelled", message="asked")),
        Reply(id=None, status="ok", result={"id": "t-3", "state": "unseen"}),  # a control answer
    ]
    for reply in replies:
        validator.validate(reply.wire_dict())


def test_reply_payload_rejects_a_body_the_daemon_never_writes(document: dict[str, Any]) -> None:
    validator = payload_validator(document, "Reply")
    body = Reply(id="t-1", status="ok").wire_dict()
    assert not validator.is_valid(body | {"extra": 1})
    assert not validator.is_valid(body | {"status": "progress"})
    assert not validator.is_valid(body | {"error": {"code": "nope", "message": ""}})
    # Every key is always written: a body without one is not the daemon's.
    assert not validator.is_valid({key: value for key, value in body.items() if key != "timing"})


def test_progress_payload(document: dict[str, Any]) -> None:
    validator = payload_validator(document, "Progress")
    body = ProgressMessage(id="t-1", progress={"epoch": 2}, seq=2, attempt=1).model_dump()
    validator.validate(body)
    assert not validator.is_valid(body | {"status": "ok"})
    assert not validator.is_valid(body | {"seq": 0})
    assert not validator.is_valid(body | {"extra": True})


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"v": 1, "op": "status"}, True),
        ({"v": 1, "op": "cancel", "id": "t-1"}, True),
        ({"v": 1, "op": "cancel"}, False),
        ({"v": 1, "op": "task", "id": "t-1"}, True),
        ({"v": 1, "op": "task"}, False),
        ({"v": 1, "op": "restart"}, False),
        ({"v": 1, "op": "status", "id": "t-1"}, False),
    ],
)
def test_control_payload(document: dict[str, Any], body: dict[str, Any], valid: bool) -> None:
    assert model_accepts(ControlRequest, body) is valid
    assert payload_validator(document, "ControlRequest").is_valid(body) is valid


def test_every_example_fits_its_message(document: dict[str, Any]) -> None:
    for name, message in document["components"]["messages"].items():
        assert message["examples"], name
        for example in message["examples"]:
            if "payload" in example:
                payload_validator(document, name).validate(example["payload"])
            if "headers" in example:
                Draft7Validator(message["headers"]).validate(example["headers"])


def test_headers_come_from_the_topology_constants(document: dict[str, Any]) -> None:
    messages = document["components"]["messages"]

    def header_names(message: str) -> set[str]:
        return set(messages[message]["headers"]["properties"])

    assert header_names("Task") == {PROGRESS_HEADER, REPLAY_HEADER}
    assert header_names("Reply") == {STATUS_HEADER, TRUNCATED_HEADER}
    assert header_names("Progress") == {STATUS_HEADER}
    assert header_names("DeadLetter") == {
        ERROR_CODE_HEADER,
        ERROR_MESSAGE_HEADER,
        SOURCE_QUEUE_HEADER,
        ATTEMPTS_HEADER,
        DEAD_LETTERED_AT_HEADER,
        TRACEBACK_HEADER,
        UNDELIVERED_REPLY_HEADER,
        ORIGINAL_USER_HEADER,
        TRUNCATED_HEADER,
    }
    progress = Draft7Validator(messages["Progress"]["headers"])
    assert progress.is_valid({STATUS_HEADER: "progress"})
    assert not progress.is_valid({STATUS_HEADER: "ok"})
    reply = Draft7Validator(messages["Reply"]["headers"])
    assert reply.is_valid({STATUS_HEADER: "ok"})
    assert not reply.is_valid({STATUS_HEADER: "progress"})
    assert not reply.is_valid({})


# (d) the contract's topology, with the daemon's declarations


def test_every_queue_of_the_contract_is_a_channel(document: dict[str, Any]) -> None:
    by_address = {channel["address"]: channel for channel in document["channels"].values()}
    for name in CONTRACT_QUEUES:
        assert name in by_address, f"no channel for queue {name}"
        binding = by_address[name]["bindings"]["amqp"]
        assert binding["is"] == "queue"
        assert binding["queue"]["name"] == name
        assert binding["queue"]["durable"] is True


def test_every_exchange_of_the_contract_is_bound(document: dict[str, Any]) -> None:
    exchanges = {
        binding["exchange"]["name"]: binding["exchange"]
        for channel in document["channels"].values()
        if (binding := channel.get("bindings", {}).get("amqp", {})).get("is") == "routingKey"
    }
    assert exchanges.keys() == CONTRACT_EXCHANGES.keys()
    for name, kind in CONTRACT_EXCHANGES.items():
        assert exchanges[name]["type"] == kind
        assert exchanges[name]["durable"] is True


def test_task_channels_route_by_type(document: dict[str, Any]) -> None:
    channels = document["channels"]
    for task_type in TASK_TYPES:
        channel = channels[f"task_{task_type}"]
        assert channel["address"] == task_type
        assert channel["bindings"]["amqp"]["exchange"]["name"] == "swarm.tasks"
        queue = channels[f"task_queue_{task_type}"]
        assert queue["address"] == f"swarm.tasks.{task_type}"
    results = channels["results"]
    assert results["address"] == "{type}.{status}"
    assert results["parameters"]["type"]["enum"] == [*TASK_TYPES, "control"]
    assert results["parameters"]["status"]["enum"] == ["ok", "error", "expired", "cancelled"]
    assert channels["reply"]["address"] is None


def test_declarations_match_the_daemons(document: dict[str, Any]) -> None:
    arguments = {
        channel["address"]: channel["bindings"]["amqp"]["queue"]["x-arguments"]
        for channel in document["channels"].values()
        if channel.get("bindings", {}).get("amqp", {}).get("is") == "queue"
    }
    for task_type in TASK_TYPES:
        assert arguments[f"swarm.tasks.{task_type}"] == broker.amqp.topology.TASK_QUEUE_ARGUMENTS
    assert arguments["swarm.control"] == broker.amqp.topology.CONTROL_QUEUE_ARGUMENTS
    assert arguments["swarm.dead"] == broker.amqp.topology.DEAD_QUEUE_ARGUMENTS


# (e) the shape of an AsyncAPI 3.0.0 document


def test_document_is_asyncapi_3(document: dict[str, Any]) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "Swarm wire contract"
    assert document["info"]["version"] == "1.0.0"
    assert document["defaultContentType"] == CONTENT_TYPE == "application/msgpack"
    servers = document["servers"]
    assert servers["amqp"] | {"protocolVersion": "0.9.1"} == servers["amqp"]
    assert {server["protocol"] for server in servers.values()} == {"amqp", "amqps"}
    assert set(document["components"]["messages"]) == {
        "Task",
        "Reply",
        "Progress",
        "ControlRequest",
        "DeadLetter",
    }


def test_operations_reference_channels_and_their_messages(document: dict[str, Any]) -> None:
    channels = document["channels"]
    operations = document["operations"]
    assert {f"send_task_{task_type}" for task_type in TASK_TYPES} | {
        "receive_results",
        "receive_dead_letters",
        "send_control",
    } == set(operations)

    def check(channel_ref: dict[str, str], message_refs: list[dict[str, str]]) -> None:
        channel_id = channel_ref["$ref"].removeprefix("#/channels/")
        assert channel_ref["$ref"].startswith("#/channels/") and channel_id in channels
        assert message_refs
        for message in message_refs:
            prefix = f"#/channels/{channel_id}/messages/"
            assert message["$ref"].startswith(prefix), message
            assert message["$ref"].removeprefix(prefix) in channels[channel_id]["messages"]

    for name, operation in operations.items():
        assert operation["action"] in ("send", "receive"), name
        check(operation["channel"], operation["messages"])
        if "reply" in operation:
            check(operation["reply"]["channel"], operation["reply"]["messages"])
            assert operation["reply"]["address"]["location"] == "$message.header#/reply_to"
    for channel in channels.values():
        for message in channel["messages"].values():
            assert message["$ref"].startswith("#/components/messages/")
    for message in document["components"]["messages"].values():
        if "correlationId" in message:
            assert message["correlationId"]["location"] == "$message.header#/correlation_id"


def test_task_send_is_persistent_and_replied(document: dict[str, Any]) -> None:
    for task_type in TASK_TYPES:
        operation = document["operations"][f"send_task_{task_type}"]
        assert operation["bindings"]["amqp"]["deliveryMode"] == 2
        replies = {message["$ref"].rsplit("/", 1)[1] for message in operation["reply"]["messages"]}
        assert replies == {"Reply", "Progress"}


# The official AsyncAPI JSON Schema (npm @asyncapi/specs, locked in tests/asyncapi/)


@pytest.mark.requires_tool("npm", why="the official schema comes from npm")
def test_document_validates_against_the_official_schema(
    document: dict[str, Any], tmp_path: Path
) -> None:
    for name in ("package.json", "package-lock.json"):
        shutil.copy(SPECS / name, tmp_path / name)
    done = subprocess.run(
        ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_S,
    )
    assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    spec_path = tmp_path / "node_modules" / "@asyncapi" / "specs" / "schemas"
    spec = json.loads((spec_path / "3.0.0-without-$id.json").read_text())
    validator = Draft7Validator(spec)
    errors = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message[:200]}"
        for error in validator.iter_errors(json.loads(asyncapi.render()))
    ]
    assert not errors, "\n".join(errors)
    # The check has teeth: OpenAPI's discriminator object is not AsyncAPI's.
    broken = json.loads(asyncapi.render())
    broken["components"]["schemas"]["ControlRequest"]["discriminator"] = {"propertyName": "op"}
    assert not validator.is_valid(broken)
