"""A Ray cluster under Ray's real autoscaler, with its fake multi-node provider: worker nodes
(with logical GPUs) come and go as the autoscaler decides, as they would on a cloud.

Started with `ray start --head --autoscaling-config` in a process group of its own, and stopped
by killing that group (the head, the autoscaler's monitor and the nodes it launched). Never
`ray stop` and never `AutoscalingCluster.start()`, which runs `ray stop --force`: both stop
every Ray on the machine, this test session's included.
"""

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RAY = str(Path(sys.executable).with_name("ray"))
MEMORY_MARK = "swarm_memory_node"
# Token authentication, as Ray's default for a new local cluster is: stated, not left to
# whether a token file happens to exist (with the mode unset, a `ray start` head turns it on
# when ~/.ray/auth_token exists, and a driver joining by address does not). The token is
# given too, so that no file in the home directory is needed or written. Whatever joins the
# cluster needs the same settings.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def autoscaling_config(gcs_port: int, node_types: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The cluster launcher's config for the fake provider: a head without GPUs (2 CPUs)
    and `node_types` ({name: {"resources": ..., "min_workers": ..., "max_workers": ...}})."""
    available = {"ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0}}
    for name, spec in node_types.items():
        available[name] = {"node_config": {}, "min_workers": 0, **spec}
    return {
        "cluster_name": f"swarm-test-{gcs_port}",
        "max_workers": sum(spec.get("max_workers", 0) for spec in node_types.values()),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Not the provider's default (6379): that is Redis's port on many machines.
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "available_node_types": available,
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        # An idle node goes after 6 s (the autoscaler's minimum unit is a minute's fraction).
        "idle_timeout_minutes": 0.1,
        "auth": {"ssh_user": "swarm"},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class AutoscalingCluster:
    address: str
    config_path: Path
    process_group: int

    def stop(self) -> None:
        """Kill the head, the monitor and every node it launched (one process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process_group, signal.SIGKILL)


def start_autoscaling_cluster(
    workdir: Path, node_types: dict[str, dict[str, Any]]
) -> AutoscalingCluster:
    port = free_port()
    config_path = workdir / "autoscaling.json"
    # JSON is YAML: the autoscaler reads it, and so does the daemon's SWARM_AUTOSCALER_CONFIG.
    config_path.write_text(json.dumps(autoscaling_config(port, node_types)))
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        **AUTH,
    }
    env.pop("RAY_ADDRESS", None)
    command = [
        RAY, "start", "--head", "--port", str(port), "--num-cpus", "2",
        f"--autoscaling-config={config_path}", "--include-dashboard=false",
        "--disable-usage-stats",
        # Ports of their own: the test session's Ray holds the defaults.
        "--dashboard-agent-listen-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
    ]  # fmt: skip
    started = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    cluster = AutoscalingCluster(f"127.0.0.1:{port}", config_path, started.pid)
    try:
        output, _ = started.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        cluster.stop()
        raise
    if started.returncode != 0:
        cluster.stop()
        raise RuntimeError(f"ray start failed: {output.decode(errors='replace')[-2000:]}")
    return cluster
