"""The scheduler-at-scale bench (bench/scale.py) at a tiny size: it runs end to end, exits 0,
prints its table, and its JSON has a positive cost per decision for every size, the growth
against the first size, and the wake-ups it was meant to cause (queues kept full). Never a
claim about speed."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = "3x12,6x40"


def run_bench(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "scale.py"),
            f"--sizes={SIZES}",
            "--decisions=200",
            "--rounds=2",
            "--waiting=4",
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_scale_bench_runs_at_a_tiny_size() -> None:
    done = run_bench("--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["meta"]["rounds"] == 2
    rows = report["results"]
    assert [(row["nodes"], row["actors"]) for row in rows] == [(3, 12), (6, 40)]
    assert rows[0]["growth"] == 1.0
    for row in rows:
        assert row["decisions"] == 2 * 200
        assert 0 < row["us_min"] <= row["us_per_decision"] <= row["us_max"]
        assert set(row["us_by_call"]) == {"place", "acquire", "release", "reap"}
        assert row["sizing_pass_ms"] > 0
        for one in row["rounds"]:
            # Tasks arrived faster than they finished: the queues were still full at the end.
            assert sum(one["waiting_at_end"].values()) > 0
            assert one["running_at_end"] > 0


def test_scale_bench_prints_a_table() -> None:
    done = run_bench()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "us/decision" in done.stdout
    assert len(done.stdout.strip().splitlines()) == 1 + len(SIZES.split(","))
