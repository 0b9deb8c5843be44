"""Settings from the environment and a TOML file, and `swarm config` showing them masked."""

import json
import os
import subprocess
from pathlib import Path

from daemon_process import SWARM

TOML = """
amqp_url = "amqp://swarm:tomlsecret@rabbit.internal:5672/prod"
prefetch = 17
drain_timeout_s = 7.5
handler_modules = ["workers.workloads.handlers", "workers.diagnostics"]
"""


def swarm(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_") and k != "AMQP_URL"}
    return subprocess.run(
        [SWARM, *args], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def test_the_environment_wins_over_the_file_and_secrets_are_masked(tmp_path: Path) -> None:
    config = tmp_path / "swarm.toml"
    config.write_text(TOML)
    done = swarm("--config", str(config), "config", "--json", SWARM_PREFETCH="99")
    assert done.returncode == 0, done.stderr
    values = json.loads(done.stdout)
    assert values["prefetch"] == 99, "the environment wins"
    assert values["drain_timeout_s"] == 7.5, "the file fills in"
    assert values["handler_modules"] == ["workers.workloads.handlers", "workers.diagnostics"]
    assert values["metrics_port"] == 9464, "defaults for the rest"
    assert values["amqp_url"] == "amqp://swarm:***@rabbit.internal:5672/prod"
    assert "tomlsecret" not in done.stdout + done.stderr


def test_swarm_config_env_names_the_file_and_the_table_names_each_variable(
    tmp_path: Path,
) -> None:
    config = tmp_path / "swarm.toml"
    config.write_text(TOML)
    done = swarm("config", SWARM_CONFIG=str(config), AMQP_URL="amqp://u:envsecret@h:5672/")
    assert done.returncode == 0, done.stderr
    assert "SWARM_PREFETCH" in done.stdout and "17" in done.stdout
    assert "amqp://u:***@h:5672/" in done.stdout
    assert "envsecret" not in done.stdout and "tomlsecret" not in done.stdout


def test_a_missing_or_invalid_file_is_one_clear_line(tmp_path: Path) -> None:
    missing = swarm("--config", str(tmp_path / "nope.toml"), "config")
    assert missing.returncode == 2
    assert "no such file" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('prefetch = "lots"\n')
    invalid = swarm("--config", str(bad), "config")
    assert invalid.returncode == 2
    assert "invalid configuration" in invalid.stderr and "prefetch" in invalid.stderr
