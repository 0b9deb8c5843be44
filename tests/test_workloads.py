"""The built-in workloads through RabbitMQ and Ray: a model trained, used, and data processed."""

import asyncio
from pathlib import Path

import numpy as np
import pytest
from conftest import DaemonFactory

from broker.daemon import Daemon
from broker.producer.client import SwarmClient
from schemas.progress import ProgressMessage
from workers.workloads.mlp import generate_dataset, train
from workers.workloads.store import ModelStore

GENERATE = {"samples": 600, "features": 6, "classes": 3, "seed": 7}


@pytest.fixture
async def workload_daemon(start_daemon: DaemonFactory, tmp_path: Path) -> Daemon:
    return await start_daemon(model_dir=tmp_path / "models")


async def test_train_then_predict_with_the_stored_model(
    workload_daemon: Daemon, amqp_url: str, tmp_path: Path
) -> None:
    progress: list[ProgressMessage] = []
    async with SwarmClient(amqp_url, reply_timeout_s=120) as client:
        trained = await asyncio.wait_for(
            await client.send(
                "training",
                "train",
                {"model": "blobs", "generate": GENERATE, "epochs": 40, "report_every": 10},
                on_progress=progress.append,
            ),
            120,
        )
        assert trained.status == "ok", trained.error
        result = trained.result
        print(
            f"trained: loss={result['loss']:.3f} accuracy={result['accuracy']:.3f} "
            f"backend={result['backend']} run_ms={trained.timing.run_ms:.0f}"
        )
        assert result["model"] == "blobs" and result["version"] == 1
        assert result["accuracy"] >= 0.9
        assert (result["features"], result["classes"]) == (6, 3)
        assert [p.progress["epoch"] for p in progress] == [10, 20, 30, 40]
        losses = [p.progress["loss"] for p in progress]
        assert losses[-1] < losses[0], "the loss went down"
        stored = ModelStore(tmp_path / "models")
        assert stored.version("blobs") == 1

        x, y = generate_dataset(**GENERATE)
        chunks = [(x[i : i + 30], y[i : i + 30]) for i in range(0, 600, 30)]
        futures = [
            await client.send("inference", "predict", {"model": "blobs", "inputs": rows.tolist()})
            for rows, _ in chunks
        ]
        replies = await asyncio.gather(*futures)
    assert all(r.status == "ok" for r in replies), [r.error for r in replies if r.error]
    predicted = np.concatenate([r.result["predictions"] for r in replies])
    accuracy = float((predicted == y).mean())
    batches = [r.result["batch"] for r in replies]
    print(f"predicted 600 rows in {len(replies)} tasks: accuracy={accuracy:.3f} batches={batches}")
    assert accuracy >= 0.9
    assert all(len(r.result["probabilities"][0]) == 3 for r in replies)
    assert max(batches) > 1, "queued predict tasks ran as one batched call"


async def test_predict_reloads_a_retrained_model_and_fails_alone_on_an_unknown_one(
    workload_daemon: Daemon, amqp_url: str
) -> None:
    async with SwarmClient(amqp_url, reply_timeout_s=120) as client:
        for version in (1, 2):
            trained = await client.submit(
                "training", "train", {"model": "m", "generate": GENERATE, "epochs": 5}
            )
            assert trained.status == "ok" and trained.result["version"] == version
            row = [[0.0] * 6]
            known, unknown = await asyncio.gather(
                await client.send("inference", "predict", {"model": "m", "inputs": row}),
                await client.send("inference", "predict", {"model": "nope", "inputs": row}),
            )
            assert known.status == "ok" and known.result["version"] == version
            assert unknown.status == "error" and unknown.error is not None
            assert unknown.error.code == "handler_error"
            assert "no model named 'nope'" in unknown.error.message


async def test_aggregate_groups_filters_and_summarises(
    workload_daemon: Daemon, amqp_url: str
) -> None:
    records = [
        {"region": "eu", "amount": 10.0, "items": 1},
        {"region": "us", "amount": 5.0, "items": 2},
        {"region": "eu", "amount": 30.0, "items": 3},
        {"region": "us", "amount": 7.0, "items": 4},
        {"region": "eu", "amount": 2.0, "items": 5},
    ]
    async with SwarmClient(amqp_url, reply_timeout_s=60) as client:
        reply = await client.submit(
            "data_processing",
            "aggregate",
            {
                "records": records,
                "group_by": ["region"],
                "metrics": {"amount": ["sum", "mean", "max"], "items": ["count"]},
                "where": [["amount", ">", 4]],
            },
        )
    assert reply.status == "ok", reply.error
    assert reply.result["rows_in"] == 5 and reply.result["rows_matched"] == 4
    assert reply.result["groups"] == [
        {
            "region": "eu",
            "amount_sum": 40.0,
            "amount_mean": 20.0,
            "amount_max": 30.0,
            "items_count": 2,
        },
        {
            "region": "us",
            "amount_sum": 12.0,
            "amount_mean": 6.0,
            "amount_max": 7.0,
            "items_count": 2,
        },
    ]


async def test_workload_args_are_checked_before_any_work(
    workload_daemon: Daemon, amqp_url: str
) -> None:
    async with SwarmClient(amqp_url, reply_timeout_s=60) as client:
        both = await client.submit(
            "training", "train", {"model": "x", "generate": GENERATE, "x": [[1.0]], "y": [0]}
        )
        bad_name = await client.submit(
            "training", "train", {"model": "../etc", "generate": GENERATE}
        )
        unknown_column = await client.submit(
            "data_processing",
            "aggregate",
            {"records": [{"a": 1}], "metrics": {"b": ["sum"]}},
        )
    assert both.error is not None and both.error.code == "invalid"
    assert bad_name.error is not None and bad_name.error.code == "invalid"
    assert unknown_column.error is not None and unknown_column.error.code == "handler_error"
    assert "b" in unknown_column.error.message


async def test_queued_predict_tasks_run_as_one_batch(
    start_daemon: DaemonFactory, amqp_url: str, tmp_path: Path
) -> None:
    """40 tasks already queued when the daemon starts: the ledger admits them all to the one
    actor (a batch handler's runs share its request), and they reach the model together."""
    x, y = generate_dataset(**GENERATE)
    trained = train(x, y, epochs=5, backend="numpy")
    ModelStore(tmp_path / "models").save("queued", trained.weights, {})
    async with SwarmClient(amqp_url, reply_timeout_s=120) as client:  # declares the topology
        futures = [
            await client.send(
                "inference", "predict", {"model": "queued", "inputs": x[n : n + 1].tolist()}
            )
            for n in range(40)
        ]
        await start_daemon(model_dir=tmp_path / "models", cpu_pool_max=1)
        replies = await asyncio.wait_for(asyncio.gather(*futures), 120)
    assert all(r.status == "ok" for r in replies), replies[0].error
    batches = sorted(r.result["batch"] for r in replies)
    print(f"batch sizes: {batches}")
    # Without the shared request the ledger admitted 20 (0.05 CPU each on a 1-CPU actor).
    assert batches[-1] > 20
