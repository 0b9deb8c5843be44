"""The Ray adapter for the resource ledger: connects to Ray and reports nodes as plain data."""

import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from workers.errors import WorkerError
from workers.resources import ResourceVector

_BYTES_PER_MB = 1024 * 1024
# Keys Ray reports per node that are bookkeeping, not schedulable capacity we track.
_NOT_CUSTOM = {"CPU", "GPU", "memory", "object_store_memory"}


class RayUnavailable(WorkerError):
    """Ray could not be started or joined."""


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    alive: bool
    address: str
    total: ResourceVector
    custom: dict[str, float] = field(default_factory=dict)


class _NoSigtermWarning(logging.Filter):
    """Ray warns that it set no SIGTERM handler when joined off the main thread: the daemon
    joins from a thread on purpose, to keep its own handler (broker/daemon.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SIGTERM handler is not set")


def connect(address: str | None, *, num_cpus: int | None = None) -> None:
    """Join the cluster at `address`, or start a local Ray without the dashboard."""
    import ray

    if ray.is_initialized():
        return
    logging.getLogger("ray._private.worker").addFilter(_NoSigtermWarning())
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": True,
        "configure_logging": False,
    }
    if address:
        _probe(address)
        options["address"] = address
    else:
        # "local", not None: without an address ray.init joins any cluster it finds on the
        # machine (a `ray start`, another process's Ray), which is not what embedded means.
        options["address"] = "local"
        if num_cpus is not None:
            options["num_cpus"] = num_cpus
    try:
        ray.init(**options)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, TimeoutError, ...
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        hint = (
            "start one with `ray start --head` or unset RAY_ADDRESS to run Ray embedded"
            if address
            else "check that Ray is installed and the machine has free memory"
        )
        raise RayUnavailable(f"cannot reach {where}: {exc}; {hint}") from exc


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a GCS address that does not answer: ray.init retries for minutes."""
    if "://" in address or ":" not in address:
        return  # ray://, auto: let Ray resolve them
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise RayUnavailable(
            f"cannot reach the Ray cluster at {address}: {exc}; start one with "
            "`ray start --head` or unset RAY_ADDRESS to run Ray embedded"
        ) from exc


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def read_nodes() -> list[NodeInfo]:
    """The cluster's nodes with their total resources. Blocking: call it off the event loop."""
    import ray

    nodes = []
    raw_nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    for raw in raw_nodes:
        resources: dict[str, float] = raw.get("Resources", {})
        custom = {
            key: value
            for key, value in resources.items()
            if key not in _NOT_CUSTOM and not key.startswith("node:")
        }
        nodes.append(
            NodeInfo(
                node_id=raw["NodeID"],
                alive=bool(raw.get("Alive")),
                address=str(raw.get("NodeManagerAddress", "")),
                total=ResourceVector(
                    cpus=float(resources.get("CPU", 0.0)),
                    gpus=float(resources.get("GPU", 0.0)),
                    memory_mb=int(resources.get("memory", 0.0) // _BYTES_PER_MB),
                ),
                custom=custom,
            )
        )
    return nodes
