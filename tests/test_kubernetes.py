"""deploy/kubernetes: every manifest parses; the core objects validate against Kubernetes' JSON
schemas (kubernetes-validate ships them, so no network is needed); the custom resources have
the fields their operators require; and the pieces fit together: each RayCluster worker group
holds an actor of its Swarm pool as the ConfigMap shapes it, and the daemon's probes, grace
period, Secret and Ray address match its settings and the other objects. No RabbitMQ or Ray
cluster is needed."""

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from broker.settings import Settings
from workers.autoscaling import NodeType, node_type_from_resources
from workers.pool import PoolSpec

DEPLOY = Path(__file__).parent.parent / "deploy" / "kubernetes"
KUSTOMIZE_FILES = {"kustomization.yaml", "kustomizeconfig.yaml"}
# The oldest Kubernetes the manifests aim at, and the newest the package knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# Custom resources: kubernetes-validate has no schema for them (checked structurally below).
CUSTOM = {"ray.io/v1", "rabbitmq.com/v1beta1", "monitoring.coreos.com/v1"}
BYTES_PER_MB = 1024 * 1024

Manifest = dict[str, Any]


def manifests() -> Iterator[tuple[Path, Manifest]]:
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name in KUSTOMIZE_FILES:
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                yield path, document


def one(kind: str) -> Manifest:
    found = [document for _, document in manifests() if document["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(template: Manifest, name: str | None = None) -> Manifest:
    containers: list[Manifest] = template["spec"]["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The daemon's settings as the pod reads them: the ConfigMap and the Secret as its
    environment, and nothing from the environment of the test run."""
    for name in list(os.environ):
        if name.startswith("SWARM_") or name in ("AMQP_URL", "RAY_ADDRESS"):
            monkeypatch.delenv(name)
    for name, value in pod_environment().items():
        monkeypatch.setenv(name, value)
    return Settings()


def pod_environment() -> dict[str, str]:
    daemon = container(one("Deployment")["spec"]["template"])
    values: dict[str, str] = {}
    for source in daemon.get("envFrom", []):
        config_map = one("ConfigMap")
        assert source["configMapRef"]["name"] == config_map["metadata"]["name"]
        values.update(config_map["data"])
    secret = one("Secret")
    for variable in daemon["env"]:
        if "value" in variable:
            values[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            values[variable["name"]] = secret["stringData"][ref["key"]]
    return values


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in DEPLOY.glob("*.yaml")} - KUSTOMIZE_FILES
    assert listed == present
    # The ServiceMonitor is optional (its CRD may be absent), so it stays out.
    optional = [document["kind"] for path, document in manifests() if path.parent != DEPLOY]
    assert optional == ["ServiceMonitor"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate(version: str) -> None:
    checked = 0
    for path, document in manifests():
        if document["apiVersion"] in CUSTOM:
            continue
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {document['kind']}: {'.'.join(map(str, exc.path))}: {exc}")
        checked += 1
    assert checked >= 6  # Namespace, ConfigMap, Secret, Deployment, Service, PDB


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_ray_pod_templates_validate(version: str) -> None:
    """The RayCluster's pod templates are core PodTemplateSpecs: validated as such."""
    spec = one("RayCluster")["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        kubernetes_validate.validate({**template, "template": group["template"]}, version, True)


def test_custom_resources_have_what_their_operators_require() -> None:
    ray = one("RayCluster")
    assert ray["apiVersion"] == "ray.io/v1"
    spec = ray["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    # The daemon reads node types from Ray only under autoscaler v2.
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "memory", "gpu"}
    for group in groups.values():
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(group)
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    # Scale from zero.
    assert groups["gpu"]["minReplicas"] == 0
    assert groups["memory"]["minReplicas"] == 0

    rabbit = one("RabbitmqCluster")
    assert rabbit["apiVersion"] == "rabbitmq.com/v1beta1"
    assert rabbit["spec"]["replicas"] == 3

    monitor = one("ServiceMonitor")
    service = one("Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    ports = {port["name"] for port in service["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= ports


def test_the_configmap_names_only_real_settings(settings: Settings) -> None:
    known = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        known.add(alias.choices[0] if alias is not None else f"SWARM_{name.upper()}")  # type: ignore[union-attr]
    assert set(one("ConfigMap")["data"]) <= known
    assert settings.gpu_pool_min == 0
    assert settings.memory_pool_min == 0


def head_params() -> dict[str, str]:
    params: dict[str, str] = one("RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]
    return params


def group_resources(group: Manifest) -> dict[str, float]:
    """What `ray start` advertises for a group, as KubeRay starts it: rayStartParams first,
    else the container's limits (memory in bytes, custom resources by name)."""
    params = group["rayStartParams"]
    limits = container(group["template"]).get("resources", {}).get("limits", {})
    resources = {
        "CPU": float(params.get("num-cpus", parse_quantity(limits.get("cpu", "0")))),
        "GPU": float(params.get("num-gpus", parse_quantity(limits.get("nvidia.com/gpu", "0")))),
        "memory": float(params.get("memory", parse_quantity(limits.get("memory", "0")))),
    }
    if "resources" in params:
        # KubeRay's format: a JSON map inside a pair of quotes.
        raw = params["resources"]
        assert raw[0] == raw[-1] == '"', raw
        resources.update(json.loads(raw[1:-1].replace("\\", "")))
    return resources


def parse_quantity(quantity: str) -> float:
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3}
    for suffix, factor in suffixes.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity)


def pool(settings: Settings, name: str) -> PoolSpec:
    return next(spec for spec in settings.pool_specs() if spec.name == name)


def node_type(group: Manifest) -> NodeType:
    return node_type_from_resources(
        group["groupName"], group_resources(group), group["maxReplicas"]
    )


@pytest.mark.parametrize("name", ["cpu", "memory", "gpu"])
def test_each_worker_group_holds_an_actor_of_its_pool(settings: Settings, name: str) -> None:
    """Decided by the daemon's own rule for a node type (NodeType.could_host), with the pool
    shapes the ConfigMap gives."""
    groups = {g["groupName"]: g for g in one("RayCluster")["spec"]["workerGroupSpecs"]}
    spec = pool(settings, name)
    assert node_type(groups[name]).could_host(spec.shape, spec.custom_resources)
    resources = group_resources(groups[name])
    assert resources["CPU"] >= spec.shape.cpus
    assert resources["GPU"] >= spec.shape.gpus
    assert resources["memory"] >= spec.shape.memory_mb * BYTES_PER_MB
    # Ray never advertises more than the pod may use.
    limits = container(groups[name]["template"])["resources"]["limits"]
    assert resources["CPU"] <= parse_quantity(limits["cpu"])
    assert resources["memory"] <= parse_quantity(limits["memory"])


def test_only_the_memory_group_is_marked_and_only_the_gpu_group_has_gpus(
    settings: Settings,
) -> None:
    groups = {g["groupName"]: g for g in one("RayCluster")["spec"]["workerGroupSpecs"]}
    marker = settings.memory_node_resource
    assert group_resources(groups["memory"]).get(marker, 0) >= 1
    memory_pool = pool(settings, "memory")
    for name in ("cpu", "gpu"):
        assert marker not in group_resources(groups[name])
        assert not node_type(groups[name]).could_host(
            memory_pool.shape, memory_pool.custom_resources
        )

    gpu = groups["gpu"]
    gpu_limits = container(gpu["template"])["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) == int(gpu["rayStartParams"]["num-gpus"])
    for name in ("cpu", "memory"):
        assert group_resources(groups[name])["GPU"] == 0
        assert "nvidia.com/gpu" not in container(groups[name]["template"])["resources"]["limits"]

    # The head runs no actor of any pool.
    head = head_params()
    assert head["num-cpus"] == "0"
    assert head["num-gpus"] == "0"


def test_ray_autoscaler_reads_the_groups_as_we_do() -> None:
    """Ray's own KubeRay config reader (a private module: skipped where it moved) sees the
    same resources for each group as the checks above."""
    try:
        from ray.autoscaler._private.kuberay.autoscaling_config import (
            _get_ray_resources_from_group_spec,
        )
    except ImportError:
        pytest.skip("Ray's KubeRay autoscaling config reader is not where it was")
    for group in one("RayCluster")["spec"]["workerGroupSpecs"]:
        theirs = _get_ray_resources_from_group_spec(group, False)
        ours = {k: v for k, v in group_resources(group).items() if v}
        theirs = {k: float(v) for k, v in theirs.items() if v}
        assert theirs == ours, group["groupName"]


def test_the_daemon_deployment_fits_its_settings(settings: Settings) -> None:
    deployment = one("Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    daemon = container(spec["template"])
    assert spec["replicas"] == 2  # active and hot standby
    assert pod["terminationGracePeriodSeconds"] > settings.drain_timeout_s
    assert "swarm run" in " ".join(daemon["command"])

    # Probes on the real paths, on the port the daemon serves, bound beyond loopback.
    ports = {port["name"]: port["containerPort"] for port in daemon["ports"]}
    for probe, path in (
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ):
        get = daemon[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == settings.metrics_port
    assert settings.metrics_host not in ("127.0.0.1", "localhost", "::1")

    # Non-root.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert daemon["securityContext"]["allowPrivilegeEscalation"] is False

    # The PDB and the metrics Service select the daemon's pods.
    labels = spec["template"]["metadata"]["labels"]
    pdb = one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] == 1
    service = one("Service")["spec"]
    assert service["selector"].items() <= labels.items()
    assert {port["targetPort"] for port in service["ports"]} <= set(ports)
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)


def test_the_secret_feeds_amqp_url_with_every_rabbitmq_node(settings: Settings) -> None:
    daemon = container(one("Deployment")["spec"]["template"])
    amqp = next(v for v in daemon["env"] if v["name"] == "AMQP_URL")
    assert amqp["valueFrom"]["secretKeyRef"]["name"] == one("Secret")["metadata"]["name"]
    lease = next(v for v in daemon["env"] if v["name"] == "SWARM_LEASE_SECRET")
    assert "secretKeyRef" in lease["valueFrom"]  # the same for both daemons

    rabbit = one("RabbitmqCluster")
    name = rabbit["metadata"]["name"]
    # The operator's names: pods <name>-server-<i> behind the headless service <name>-nodes.
    expected = {f"{name}-server-{i}.{name}-nodes" for i in range(rabbit["spec"]["replicas"])}
    urls = [part.strip() for part in settings.amqp_url.get_secret_value().split(",")]
    assert {urlsplit(url).hostname for url in urls} == expected
    assert all(urlsplit(url).scheme in ("amqp", "amqps") for url in urls)


def test_ray_address_is_the_head_gcs_service(settings: Settings) -> None:
    ray = one("RayCluster")
    head = ray["spec"]["headGroupSpec"]
    # KubeRay's head service: <cluster>-head-svc, the GCS on `port` (6379 by default).
    port = int(head["rayStartParams"].get("port", "6379"))
    assert settings.ray_address == f"{ray['metadata']['name']}-head-svc:{port}"
    gcs = [p for p in container(head["template"])["ports"] if p["name"] == "gcs-server"]
    assert gcs == [{"name": "gcs-server", "containerPort": port}]


def test_kustomize_renders_it() -> None:
    """kubectl's built-in kustomize, where kubectl is installed (optional here)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not on PATH")
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    documents = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert {d["kind"] for d in documents} == {d["kind"] for _, d in manifests()} - {
        "ServiceMonitor"
    }
    namespaced = [d for d in documents if d["kind"] != "Namespace"]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"swarm"}
    ray = next(d for d in documents if d["kind"] == "RayCluster")["spec"]
    images = {container(g["template"])["image"] for g in ray["workerGroupSpecs"]}
    images.add(container(ray["headGroupSpec"]["template"])["image"])
    daemon = next(d for d in documents if d["kind"] == "Deployment")
    assert images == {container(daemon["spec"]["template"])["image"]}  # one image everywhere
