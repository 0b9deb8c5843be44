"""docker-compose.yml is valid and wired the way Swarm needs it: checked with `docker-compose
config` (no Docker engine needed), with and without the `gpu` profile."""

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import have_tool, missing_requirement

from broker.settings import Settings

ROOT = Path(__file__).parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"


def _compose_command() -> list[str] | None:
    """docker-compose, else Docker's compose plugin (`docker compose`), else None."""
    if have_tool("docker-compose"):
        return ["docker-compose"]
    if have_tool("docker compose"):
        return ["docker", "compose"]
    return None


COMPOSE = _compose_command()


@pytest.fixture(autouse=True)
def _compose_installed() -> None:
    if COMPOSE is None:
        missing_requirement("neither docker-compose nor Docker's compose plugin is on PATH")


DAEMON = "swarm"
RAY_NODES = ("ray-head", "ray-cpu-worker", "ray-memory-worker", "ray-gpu-worker")
ALWAYS = {"rabbitmq", "ray-head", "ray-cpu-worker", "ray-memory-worker", DAEMON}
# The documented development defaults: the only literal credentials the file may hold.
DEV_DEFAULTS = {"", "swarm"}
SECRET_KEY = re.compile(r"PASS|SECRET|TOKEN|KEY", re.IGNORECASE)
REFERENCE = re.compile(r"^\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}$")
_PART = r"\$\{[^}]*\}|[^:/@\s]*"
URL_USERINFO = re.compile(rf"://(?P<user>{_PART}):(?P<password>{_PART})@")

Config = dict[str, Any]


def _load_yaml(text: str) -> Config:
    """PyYAML comes with Ray; failing that, with the python3 that runs Debian's
    docker-compose."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - depends on the environment
        to_json = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
        done = subprocess.run(
            ["/usr/bin/python3", "-c", to_json], input=text, capture_output=True, text=True
        )
        if done.returncode != 0:
            missing_requirement(f"no YAML parser: {done.stderr.strip()}")
        loaded: Config = json.loads(done.stdout)
        return loaded
    loaded = yaml.safe_load(text)
    return loaded


def _variables() -> set[str]:
    return set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text()))


def _config(env_file: Path, *, profile: str | None = None, **env: str) -> Config:
    """`docker-compose config` with the file's defaults: the variables it reads are cleared
    from the environment and an empty env file stands in for a developer's `.env`."""
    assert COMPOSE is not None
    argv = [*COMPOSE, "--env-file", str(env_file), "-f", str(COMPOSE_FILE)]
    if profile is not None:
        argv += ["--profile", profile]
    base = {k: v for k, v in os.environ.items() if k not in _variables()}
    done = subprocess.run(
        [*argv, "config"],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    return _load_yaml(done.stdout)


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def config(env_file: Path) -> Config:
    return _config(env_file)


@pytest.fixture(scope="module")
def gpu_config(env_file: Path) -> Config:
    return _config(env_file, profile="gpu")


def _environment(service: Config) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {key: "" if value is None else str(value) for key, value in raw.items()}


def _command(service: Config) -> list[str]:
    raw = service.get("command") or []
    return shlex.split(raw) if isinstance(raw, str) else [str(part) for part in raw]


def _option(service: Config, name: str) -> str | None:
    for part in _command(service):
        if part.startswith(f"{name}="):
            return part.split("=", 1)[1]
    return None


def _named_mounts(service: Config) -> dict[str, str]:
    """Target -> named volume, from short ("models:/models:rw") or long syntax."""
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
        elif volume.get("type", "volume") == "volume":
            source, target = volume.get("source", ""), volume["target"]
        else:
            continue
        if source and not source.startswith(("/", ".", "~")):
            mounts[target] = source
    return mounts


def _depends_on(service: Config) -> dict[str, str]:
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def test_every_service_is_there_and_the_gpu_worker_only_with_its_profile(
    config: Config, gpu_config: Config
) -> None:
    services = config["services"]
    assert services.keys() >= ALWAYS
    # Compose v2 leaves a disabled profile's services out; 1.29 prints them with their
    # profiles, and `up` skips them.
    gpu = services.get("ray-gpu-worker")
    assert gpu is None or gpu.get("profiles") == ["gpu"]
    for name in ALWAYS:
        assert not services[name].get("profiles"), f"{name} must run without a profile"
    worker = gpu_config["services"]["ray-gpu-worker"]
    assert worker["profiles"] == ["gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device.get("driver") == "nvidia"
        and str(device.get("count")) in ("all", "-1")  # compose v2 prints "all" as -1
        and device.get("capabilities") == ["gpu"]
        for device in devices
    ), devices


def test_the_daemon_starts_once_rabbitmq_and_the_ray_head_are_healthy(config: Config) -> None:
    depends = _depends_on(config["services"][DAEMON])
    assert depends["rabbitmq"] == "service_healthy"
    assert depends["ray-head"] == "service_healthy"
    for name in ("rabbitmq", "ray-head"):
        assert config["services"][name]["healthcheck"]["test"], f"{name} has no healthcheck"
    assert "ping" in config["services"]["rabbitmq"]["healthcheck"]["test"]


def test_the_daemon_joins_the_head_and_rabbitmq(config: Config) -> None:
    services = config["services"]
    daemon = services[DAEMON]
    env = _environment(daemon)
    assert env["RAY_ADDRESS"] == "ray-head:6379"
    assert _option(services["ray-head"], "--port") in (None, "6379")
    assert "--head" in _command(services["ray-head"])
    for worker in ("ray-cpu-worker", "ray-memory-worker"):
        assert _option(services[worker], "--address") == "ray-head:6379"
    assert re.match(r"amqp://[^@]+@rabbitmq:5672/", env["AMQP_URL"])
    assert env["SWARM_MODEL_DIR"] == "/models"
    assert env["SWARM_LOG_FORMAT"] == "json"
    assert "swarm run" in " ".join(_command(daemon))


def test_one_image_for_every_ray_node_and_the_daemon(gpu_config: Config) -> None:
    services = gpu_config["services"]
    images = {services[name]["image"] for name in (*RAY_NODES, DAEMON)}
    assert len(images) == 1, f"Ray versions must match on every node: {images}"
    for name in (*RAY_NODES, DAEMON):
        build = services[name].get("build")
        if build is not None:
            assert (Path(build["context"]) / "Dockerfile").is_file()


def test_the_memory_node_advertises_the_memory_resource(config: Config) -> None:
    services = config["services"]
    memory = services["ray-memory-worker"]
    resources = json.loads(_option(memory, "--resources") or "{}")
    marker = Settings.model_fields["memory_node_resource"].default
    assert resources.get(marker, 0) >= 1
    assert _environment(services[DAEMON])["SWARM_MEMORY_NODE_RESOURCE"] == marker
    actor_mb = Settings.model_fields["memory_actor_memory_mb"].default
    assert int(_option(memory, "--memory") or 0) >= 2 * actor_mb * 1024 * 1024


def test_the_model_volume_is_shared_by_every_ray_node_and_the_daemon(
    gpu_config: Config,
) -> None:
    services = gpu_config["services"]
    for name in (*RAY_NODES, DAEMON):
        assert _named_mounts(services[name]).get("/models") == "models", name
    assert "models" in gpu_config["volumes"]
    assert _named_mounts(services["rabbitmq"]).get("/var/lib/rabbitmq") == "rabbitmq-data"


def test_ray_authentication_is_configured_alike_everywhere(gpu_config: Config) -> None:
    services = gpu_config["services"]
    settings = {
        (env.get("RAY_AUTH_MODE"), env.get("RAY_AUTH_TOKEN"))
        for env in (_environment(services[name]) for name in (*RAY_NODES, DAEMON))
    }
    assert len(settings) == 1 and None not in next(iter(settings)), settings


def test_the_daemon_exposes_its_metrics_port_and_checks_readyz(config: Config) -> None:
    daemon = config["services"][DAEMON]
    targets = {
        str(port["target"]) if isinstance(port, dict) else str(port).split("/")[0].split(":")[-1]
        for port in daemon.get("ports", [])
    }
    assert "9464" in targets
    check = " ".join(daemon["healthcheck"]["test"])
    assert "urllib" in check and "http://localhost:9464/readyz" in check


def _strings(node: object) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in (str(key), *_strings(value))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [str(node)] if node is not None else []


def _is_reference_with_dev_default(value: str) -> bool:
    match = REFERENCE.match(value)
    return match is not None and (match["default"] or "") in DEV_DEFAULTS


def _embedded_secrets(service: Config) -> list[str]:
    """Credentials written into a service other than as ${VAR} with a dev default."""
    found = [
        f"{key}={value}"
        for key, value in _environment(service).items()
        if SECRET_KEY.search(key) and not _is_reference_with_dev_default(value)
    ]
    for text in _strings(service):
        for match in URL_USERINFO.finditer(text):
            if not all(_is_reference_with_dev_default(match[p]) for p in ("user", "password")):
                found.append(text)
    return found


@pytest.mark.parametrize(
    "service",
    [
        {"environment": {"RABBITMQ_DEFAULT_PASS": "hunter2"}},
        {"environment": {"RABBITMQ_DEFAULT_PASS": "${RABBITMQ_PASSWORD:-hunter2}"}},
        {"environment": ["RAY_AUTH_TOKEN=abc"]},
        {"environment": {"AMQP_URL": "amqp://guest:guest@rabbitmq:5672/"}},
        {"command": ["x", "--url=amqp://${RABBITMQ_USER:-swarm}:hunter2@rabbitmq/"]},
    ],
)
def test_the_secret_check_catches_literal_credentials(service: Config) -> None:
    assert _embedded_secrets(service)


def test_no_service_embeds_a_secret() -> None:
    """In the file as written: every credential is a ${VAR} with at most a dev default."""
    raw = _load_yaml(COMPOSE_FILE.read_text())
    for name, service in raw["services"].items():
        assert not _embedded_secrets(service), name
    daemon_url = _environment(raw["services"][DAEMON])["AMQP_URL"]
    assert URL_USERINFO.search(daemon_url), "the check must see the daemon's credentials"


def test_credentials_come_from_the_environment(env_file: Path) -> None:
    services = _config(env_file, RABBITMQ_USER="alice", RABBITMQ_PASSWORD="s3cret")["services"]
    assert _environment(services["rabbitmq"])["RABBITMQ_DEFAULT_PASS"] == "s3cret"
    assert _environment(services[DAEMON])["AMQP_URL"].startswith("amqp://alice:s3cret@rabbitmq:")
