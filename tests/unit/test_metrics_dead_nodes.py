"""Node series in /metrics follow the cluster: a node that left has its series removed."""

from broker.ops.metrics import ClusterView, DaemonMetrics

RESOURCES = {"cpus": 4.0, "gpus": 0.0, "memory_mb": 1024}


def node(node_id: str) -> dict[str, object]:
    return {"node_id": node_id, "reserved": RESOURCES, "free": RESOURCES}


def node_labels(metrics: DaemonMetrics) -> set[str]:
    return {
        sample.labels["node"]
        for family in metrics.registry.collect()
        if family.name in ("swarm_node_reserved", "swarm_node_free")
        for sample in family.samples
    }


def test_a_node_that_left_has_no_series_left() -> None:
    metrics = DaemonMetrics()
    metrics.update(ClusterView({}, [node("a" * 20), node("b" * 20)], {}, 0))
    assert node_labels(metrics) == {"a" * 12, "b" * 12}
    metrics.update(ClusterView({}, [node("a" * 20)], {}, 0))
    assert node_labels(metrics) == {"a" * 12}
    metrics.update(ClusterView({}, [node("b" * 20)], {}, 0))  # a node may come back
    assert node_labels(metrics) == {"b" * 12}
