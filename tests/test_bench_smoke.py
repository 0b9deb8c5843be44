"""The benchmark (bench/run.py) at a tiny size: it runs end to end, exits 0 and writes its
JSON with a positive throughput for every system (ray-glue among them) and the predict rows
(Swarm and its ceiling). Never a claim about speed."""

import json
import os
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from conftest import missing_requirement, require_tool

ROOT = Path(__file__).resolve().parent.parent
LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"
PAYLOADS = ["small", "1024", "65536"]
SYSTEMS = ["reference", "ray-glue", "swarm"]


def _reachable(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 5):
            return True
    except OSError:
        return False


@pytest.mark.timeout(420)
def test_bench_runs_at_a_tiny_size(tmp_path: Path) -> None:
    url = os.environ.get("AMQP_URL") or LOCAL_URL
    require_tool("rabbitmqctl", why="the bench makes its vhosts with it")
    if not _reachable(url):
        missing_requirement(f"the bench needs a RabbitMQ that answers at {url.split('@')[-1]}")
    out = tmp_path / "latest.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--tasks=50",
            "--rounds=1",
            "--latency-tasks=5",
            "--warmup=10",
            f"--payloads={','.join(PAYLOADS)}",
            f"--systems={','.join(SYSTEMS)}",
            "--predict-tasks=50",
            f"--amqp-url={url}",
            f"--out={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"meta", "results", "systems", "rounds", "errors", "skipped"} <= result.keys()
    assert result["errors"] == []
    assert result["meta"]["systems"] == SYSTEMS
    rows = {(row["system"], row["payload"]): row for row in result["results"]}
    assert set(rows) == {(s, p) for s in SYSTEMS for p in PAYLOADS}
    for row in rows.values():
        assert row["tasks_per_s"] > 0
        assert row["ratio_vs_reference"] > 0
        for load in ("saturated", "unloaded"):
            latency = row["latency_ms"][load]
            assert 0 < latency["p50"] <= latency["p99"]
        assert row["rss_peak_mib"]["daemon"] > 0
    assert result["systems"]["swarm"]["rss_peak_mib"]["daemon"] > 0
    assert "tasks/s" in done.stdout  # the table was printed
    predicted = {row["system"]: row for row in result["predict"]["results"]}
    assert set(predicted) == {"predict-ceiling", "swarm"}
    for row in predicted.values():
        assert row["tasks"] == 50
        assert row["rows_per_s"] > 0
        assert row["ratio_vs_ceiling"] > 0
    assert 1 <= predicted["swarm"]["mean_batch"] <= 64
    assert "rows/s" in done.stdout  # and the predict table
