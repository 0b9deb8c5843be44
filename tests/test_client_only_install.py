"""A producer's install: `pip install swarm-broker` without extras, alone in a fresh virtualenv,
runs a task through a daemon, against the real RabbitMQ and Ray.

The project is built from a copy of its sources (what the Dockerfile copies), so nothing is
written into the working tree and the wheel's packaging is what is tested. The fresh venv's
size and package count are reported with the suite's figures."""

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import DaemonFactory, missing_requirement
from hardening import REPORTED

ROOT = Path(__file__).parent.parent
SOURCES = ("pyproject.toml", "README.md", "broker", "workers", "schemas")

# The daemon extra, by distribution name as `pip list` spells it (lower case).
DAEMON_ONLY = {
    "ray",
    "numpy",
    "rich",
    "prometheus-client",
    "prometheus_client",
    "typer",
    "structlog",
    "pydantic-settings",
    "pydantic_settings",
}
# What `python -m venv` puts in a bare venv: not counted as installed by the client.
BARE_VENV = {"pip", "setuptools"}

# pip's words for an index it could not reach (the machine is offline): a skip, or under CI
# a failure (missing_requirement). Any other failed install fails the test.
UNREACHABLE = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeoutError",
)

PRODUCER = """
import asyncio, json, sys
from broker.producer.client import SwarmClient
import broker.producer.client as client_module

async def main() -> None:
    async with SwarmClient(sys.argv[1]) as swarm:
        args = {"x": 1, "from": "client-only"}
        reply = await swarm.submit("inference", "echo", args, wait_s=60)
    print(json.dumps({
        "status": reply.status,
        "result": reply.result,
        "pool": reply.pool,
        "client_file": client_module.__file__,
        "daemon_modules": [
            m for m in ("ray", "numpy", "rich", "structlog", "typer") if m in sys.modules
        ],
    }))

asyncio.run(main())
"""


async def run(*command: str | Path, timeout_s: float, cwd: Path) -> tuple[int, str, str]:
    """A subprocess on the event loop (the in-process daemon keeps running meanwhile)."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH",)}
    process = await asyncio.create_subprocess_exec(
        *map(str, command),
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def size_mb(path: Path) -> float:
    total = 0
    for file in path.rglob("*"):
        if file.is_file() and not file.is_symlink():
            total += file.stat().st_size
    return total / 1e6


@pytest.mark.timeout(240)
async def test_client_only_install_runs_a_task(
    tmp_path: Path, start_daemon: DaemonFactory, amqp_url: str
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, source / name)

    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    rc, out, err = await run(sys.executable, "-m", "venv", venv, timeout_s=120, cwd=tmp_path)
    assert rc == 0, out + err
    bare_mb = size_mb(venv)

    rc, out, err = await run(
        python, "-m", "pip", "install", "--quiet", source, timeout_s=180, cwd=tmp_path
    )
    if rc != 0:
        if any(sign in out + err for sign in UNREACHABLE):
            missing_requirement(f"pip could not reach a package index: {err.strip()[-300:]}")
        pytest.fail(f"pip install of the client failed:\n{out}{err}")

    rc, out, err = await run(
        python, "-m", "pip", "list", "--format", "json", timeout_s=60, cwd=tmp_path
    )
    assert rc == 0, out + err
    installed = {package["name"].lower() for package in json.loads(out)}
    assert "swarm-broker" in installed
    assert not installed & DAEMON_ONLY, sorted(installed & DAEMON_ONLY)
    packages = sorted(installed - BARE_VENV)
    venv_mb = size_mb(venv)

    # The console script is installed; without the daemon extra it says so in one line.
    rc, out, err = await run(venv / "bin" / "swarm", "status", timeout_s=60, cwd=tmp_path)
    assert rc == 1, out + err
    assert err.strip().count("\n") == 0, err
    assert "pip install 'swarm-broker[daemon]'" in err, err

    await start_daemon()
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    rc, out, err = await run(python, script, amqp_url, timeout_s=120, cwd=tmp_path)
    assert rc == 0, out + err
    reply = json.loads(out.strip().splitlines()[-1])
    assert reply["status"] == "ok", reply
    assert reply["result"] == {"x": 1, "from": "client-only"}
    assert reply["pool"] == "cpu"
    assert Path(reply["client_file"]).is_relative_to(venv), reply["client_file"]
    assert reply["daemon_modules"] == []

    line = (
        f"client-only install: {len(packages)} packages ({', '.join(packages)}), "
        f"venv {venv_mb:.0f} MB on disk ({bare_mb:.0f} MB of it the bare venv's pip and setuptools)"
    )
    print(line)
    REPORTED.append(line)
