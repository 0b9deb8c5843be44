"""The Ray adapter for an elastic cluster: the node types its autoscaler can launch, and asking
it for room. Reports plain data; the decisions live in broker/scheduling/elastic.py.

Node types come from Ray's own cluster config where Ray exposes it (autoscaler v2, KubeRay),
else from the autoscaler's YAML file when the daemon is told where it is (the cluster
launcher keeps it on the head node as `~/ray_bootstrap_config.yaml`). Without either, the
cluster is taken as fixed: only the nodes present say what it can hold. (Every Ray head runs
an autoscaler monitor, which without a config only mirrors the nodes present, so its
presence alone does not say that nodes can be added.)
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.errors import WorkerError
from workers.resources import ResourceVector

_BYTES_PER_MB = 1024 * 1024
_NOT_CUSTOM = {"CPU", "GPU", "memory", "object_store_memory"}


class AutoscalerConfigError(WorkerError):
    """The autoscaler's config file named by the settings cannot be read."""


@dataclass(frozen=True)
class NodeType:
    """A kind of node the autoscaler can launch. `declares_memory`: whether the type states
    its memory (a type that does not gets it detected when a node starts, so a memory
    request cannot be checked against it beforehand)."""

    name: str
    total: ResourceVector
    custom: dict[str, float] = field(default_factory=dict)
    max_count: int | None = None  # None: no limit known
    declares_memory: bool = False

    def could_host(self, shape: ResourceVector, custom: dict[str, float]) -> bool:
        if self.max_count == 0:
            return False
        cpus_gpus = ResourceVector(cpus=shape.cpus, gpus=shape.gpus)
        if not cpus_gpus.fits_in(self.total):
            return False
        if self.declares_memory and shape.memory_mb > self.total.memory_mb:
            return False
        return all(self.custom.get(name, 0.0) >= amount for name, amount in custom.items())


def node_type_from_resources(
    name: str, resources: dict[str, float], max_count: int | None
) -> NodeType:
    """A node type from Ray's resource dict (memory in bytes, custom resources by name)."""
    declares_memory = "memory" in resources
    return NodeType(
        name=name,
        total=ResourceVector(
            cpus=float(resources.get("CPU", 0.0)),
            gpus=float(resources.get("GPU", 0.0)),
            memory_mb=int(float(resources.get("memory", 0.0)) // _BYTES_PER_MB),
        ),
        custom={k: float(v) for k, v in resources.items() if k not in _NOT_CUSTOM},
        max_count=max_count,
        declares_memory=declares_memory,
    )


def node_types_from_config(config: dict[str, Any]) -> list[NodeType]:
    """The worker node types of an autoscaler config (the cluster launcher's YAML, parsed).
    The head's type counts too: it is a node that can hold actors."""
    types = config.get("available_node_types")
    if not isinstance(types, dict):
        raise AutoscalerConfigError("the autoscaler config has no `available_node_types` map")
    head = config.get("head_node_type")
    found = []
    for name, spec in types.items():
        if not isinstance(spec, dict):
            raise AutoscalerConfigError(f"node type {name!r} is not a map")
        resources = spec.get("resources") or {}
        if not isinstance(resources, dict):
            raise AutoscalerConfigError(f"node type {name!r}: `resources` is not a map")
        if name == head:
            max_count: int | None = 1
        else:
            raw_max = spec.get("max_workers", config.get("max_workers"))
            max_count = None if raw_max is None else int(raw_max)
        found.append(node_type_from_resources(str(name), resources, max_count))
    return found


def read_config_file(path: Path) -> list[NodeType]:
    """Node types from the autoscaler's config file (YAML, or JSON, which YAML reads too)."""
    import yaml  # Ray's own dependency

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise AutoscalerConfigError(f"cannot read the autoscaler config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise AutoscalerConfigError(f"the autoscaler config {path} is not a map")
    return node_types_from_config(config)


def node_types_from_ray() -> list[NodeType] | None:
    """The node types Ray's GCS knows (reported by autoscaler v2 and KubeRay), or None when
    Ray does not expose them. Blocking: call it off the event loop."""
    try:
        import ray._private.state as state

        config = state.state.get_cluster_config()
    except Exception:  # a private API: its absence or failure means "not exposed"
        return None
    if config is None or not config.node_group_configs:
        return None
    return [
        node_type_from_resources(
            group.name,
            dict(group.resources),
            None if group.max_count < 0 else int(group.max_count),
        )
        for group in config.node_group_configs
    ]


def bundle(shape: ResourceVector, custom: dict[str, float], *, memory: bool) -> dict[str, float]:
    """What one actor of `shape` asks of Ray, as the autoscaler reads a resource request.
    Memory only where the node types state theirs: a type that does not would never seem to
    fit a bundle asking for memory."""
    wanted: dict[str, float] = {"CPU": shape.cpus}
    if shape.gpus:
        wanted["GPU"] = shape.gpus
    if memory and shape.memory_mb:
        wanted["memory"] = float(shape.memory_mb * _BYTES_PER_MB)
    wanted.update(custom)
    return {name: amount for name, amount in wanted.items() if amount}


def request_resources(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler for a cluster that can hold `bundles` at once (replacing the last
    request; an empty list withdraws it). Blocking: call it off the event loop."""
    from ray.autoscaler.sdk import request_resources as ray_request_resources

    ray_request_resources(bundles=bundles)
