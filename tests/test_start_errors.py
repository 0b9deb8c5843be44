"""Errors a newcomer meets first, each one line that says what to do, and a start-up that
listens: bad settings name their variable (or TOML key and file), unknown TOML keys and
impossible pool sizes are refused before anything starts, SIGTERM during start-up stops the
daemon there, and a start prints no noise. (A refused login or virtual host: tests/test_cli.py.)
"""

import os
import subprocess
from pathlib import Path

from daemon_process import SWARM, DaemonProcess


def swarm(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_") and k != "AMQP_URL"}
    return subprocess.run(
        [SWARM, *args], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("swarm: invalid configuration: ")
    return lines[0]


def test_a_bad_value_names_its_environment_variable() -> None:
    line = one_line(swarm("config", SWARM_PREFETCH="lots"))
    assert "SWARM_PREFETCH='lots': Input should be a valid integer" in line
    line = one_line(swarm("config", SWARM_GPU_DEFAULTS="not json"))
    assert "SWARM_GPU_DEFAULTS: not a value it can read" in line


def test_a_bad_value_in_the_toml_file_names_its_key_and_the_file(tmp_path: Path) -> None:
    config = tmp_path / "swarm.toml"
    config.write_text('prefetch = "lots"\n')
    line = one_line(swarm("--config", str(config), "config"))
    assert f"`prefetch` in {config}='lots'" in line


def test_unknown_toml_keys_are_refused_with_the_setting_meant(tmp_path: Path) -> None:
    config = tmp_path / "swarm.toml"
    config.write_text("prefetchh = 3\ndrain_timeout_s = 5\n")
    line = one_line(swarm("--config", str(config), "config"))
    assert f"unknown key in {config}: `prefetchh` (did you mean `prefetch`?)" in line


def test_impossible_pool_sizes_are_refused_before_anything_starts() -> None:
    # No RabbitMQ at this URL: the refusal comes first, without trying it.
    done = swarm(
        "run", SWARM_CPU_POOL_MIN="5", SWARM_CPU_POOL_MAX="2", AMQP_URL="amqp://u:p@127.0.0.1:1/"
    )
    line = one_line(done)
    assert "SWARM_CPU_POOL_MIN (5) is above SWARM_CPU_POOL_MAX (2)" in line


async def test_sigterm_during_start_up_stops_the_daemon_there(
    amqp_url: str, ray_address: str
) -> None:
    daemon = await DaemonProcess(amqp_url, ray_address).launch()
    await daemon.logged("daemon_starting")
    daemon.terminate()
    assert await daemon.wait() == 0
    events = [entry["event"] for entry in daemon.log]
    assert "stopping_during_start" in events and events[-1] == "stopped"
    assert "daemon_ready" not in events


async def test_a_start_prints_no_noise(amqp_url: str, ray_address: str) -> None:
    daemon = await DaemonProcess(amqp_url, ray_address).start()
    daemon.terminate()
    assert await daemon.wait() == 0
    assert not any("SIGTERM handler is not set" in line for line in daemon.other), daemon.other
    events = [entry["event"] for entry in daemon.log]
    assert "pool_not_started" not in events  # at debug; daemon_ready names the pools
    assert all(entry["level"] in ("info", "debug") for entry in daemon.log), daemon.log
