"""Typed settings, read once from the environment (prefix `SWARM_`) and an optional TOML
file (`SWARM_CONFIG` or `--config`), and passed down. The environment wins over the file."""

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from broker.amqp.nodes import AmqpNodes
from broker.amqp.urls import redact, split_urls
from schemas.codec import DEFAULT_MAX_BODY_BYTES, CodecLimits
from workers.pool import PoolSpec
from workers.resources import ResourceVector

TASK_DEFAULTS: dict[str, dict[str, float]] = {
    "training": {"cpus": 1.0, "gpus": 0.0, "memory_mb": 0},
    "inference": {"cpus": 0.05, "gpus": 0.0, "memory_mb": 0},
    "data_processing": {"cpus": 1.0, "gpus": 0.0, "memory_mb": 0},
}


# Names a TOML file of settings (keys are the field names: `prefetch = 128`).
CONFIG_ENV = "SWARM_CONFIG"

# The built-in training, inference and data-processing workloads (workers/workloads/).
WORKLOADS_MODULE = "workers.workloads.handlers"


class Settings(BaseSettings):
    """Every setting of the daemon, client and CLI. See the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="SWARM_", frozen=True, extra="ignore", populate_by_name=True
    )

    amqp_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@localhost:5672/"),
        validation_alias=AliasChoices("AMQP_URL", "SWARM_AMQP_URL"),
        description="RabbitMQ URL, or the URLs of a cluster's nodes (comma-separated, a list in "
        "the TOML file), tried in turn; amqps:// for TLS (cafile, certfile, keyfile as query args)",
    )
    amqp_shuffle: bool = Field(
        default=False,
        description="try the nodes of AMQP_URL in an order shuffled once per process, so that "
        "many processes given the same list spread over the nodes",
    )
    ray_address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("RAY_ADDRESS", "SWARM_RAY_ADDRESS"),
        description="Ray cluster to join; unset starts a local Ray inside the daemon",
    )
    ray_num_cpus: int | None = Field(
        default=None, description="CPUs of the embedded local Ray (default: all)"
    )
    handler_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [WORKLOADS_MODULE],
        description="comma-separated modules whose handlers to load (besides the built-ins)",
    )
    model_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "swarm" / "models",
        description="where `train` stores models and `predict` loads them; shared by all nodes",
    )
    max_body_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES, gt=0, description="largest body accepted (too_large above)"
    )
    max_depth: int = Field(default=64, gt=0, description="deepest nesting of maps and arrays")
    max_containers: int = Field(default=100_000, gt=0, description="maps+arrays in one body")
    prefetch: int = Field(default=256, gt=0, description="unacknowledged tasks per task queue")
    default_max_retries: int = Field(
        default=3, ge=0, le=20, description="retries of retryable failures when a task gives none"
    )
    retry_backoff_s: float = Field(default=0.2, ge=0, description="first retry delay")
    cpu_pool_min: int = Field(default=1, ge=0, description="CPU pool: fewest actors")
    cpu_pool_max: int = Field(default=4, ge=1, description="CPU pool: most actors")
    cpu_actor_cpus: float = Field(default=1.0, ge=0, description="CPUs each CPU actor reserves")
    gpu_pool_min: int = Field(default=1, ge=0, description="GPU pool: fewest actors")
    gpu_pool_max: int = Field(default=8, ge=1, description="GPU pool: most actors")
    gpu_actor_gpus: float = Field(default=1.0, gt=0, description="GPUs each GPU actor reserves")
    gpu_actor_cpus: float = Field(default=1.0, ge=0, description="CPUs each GPU actor reserves")
    memory_pool_min: int = Field(default=1, ge=0, description="memory pool: fewest actors")
    memory_pool_max: int = Field(default=4, ge=1, description="memory pool: most actors")
    memory_actor_memory_mb: int = Field(
        default=4096, ge=0, description="memory each memory actor reserves"
    )
    memory_actor_cpus: float = Field(
        default=1.0, ge=0, description="CPUs each memory actor reserves"
    )
    memory_node_resource: str = Field(
        default="swarm_memory_node",
        description="custom Ray resource that marks a memory node (memory actors need it)",
    )
    gpu_task_types: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["training", "inference"],
        description="task types sent to the GPU pool when it runs (comma-separated)",
    )
    gpu_defaults: dict[str, float] = Field(
        default_factory=lambda: {"training": 1.0, "inference": 0.25, "data_processing": 1.0},
        description="GPUs a task takes on the GPU pool when it names none (JSON)",
    )
    memory_task_threshold_mb: int = Field(
        default=2048, ge=0, description="tasks asking at least this memory go to the memory pool"
    )
    pool_idle_s: float = Field(
        default=60.0, ge=0, description="an actor idle this long above the pool's minimum stops"
    )
    max_waiting_per_queue: int = Field(
        default=64,
        gt=0,
        description="tasks of one queue waiting for room before its consumer pauses",
    )
    max_held_mb: int = Field(
        default=256,
        gt=0,
        description="body bytes held unsettled (all queues) before the task consumers pause",
    )
    return_memory: bool = Field(
        default=True,
        description="give memory freed after large tasks back to the OS (glibc: fixed mmap "
        "threshold, trim when idle)",
    )
    actor_max_concurrency: int = Field(
        default=64, gt=0, description="tasks one actor runs at once, whatever their size"
    )
    pool_start_timeout_s: float = Field(
        default=60.0, gt=0, description="how long an actor may take to be placed and start"
    )
    scale_up_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="on a cluster with an autoscaler: how long tasks wait for a pool with no "
        "actor while the cluster is asked to grow, before they are answered unsatisfiable",
    )
    autoscaler_config: Path | None = Field(
        default=None,
        description="the Ray autoscaler's cluster config (YAML): its node types, where Ray "
        "does not expose them (the v1 autoscaler); setting it marks the cluster elastic",
    )
    defaults_training: dict[str, float] = Field(
        default=TASK_DEFAULTS["training"], description="resources of a training task (JSON)"
    )
    defaults_inference: dict[str, float] = Field(
        default=TASK_DEFAULTS["inference"], description="resources of an inference task (JSON)"
    )
    defaults_data_processing: dict[str, float] = Field(
        default=TASK_DEFAULTS["data_processing"],
        description="resources of a data_processing task (JSON)",
    )
    log_format: Literal["console", "json"] = Field(default="console", description="log lines")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="lowest level logged"
    )
    outcome_retention_s: float = Field(
        default=3600.0,
        gt=0,
        description="how long final outcomes (and early cancels) are kept to answer duplicates",
    )
    outcome_memory_mb: int = Field(
        default=256,
        gt=0,
        description="reply bytes the outcome index keeps in memory; the oldest go first",
    )
    outcome_max_reply_mb: int = Field(
        default=32,
        gt=0,
        le=120,  # one record must fit RabbitMQ's default max_message_size (128 MiB)
        description="largest reply the outcome store remembers (at most outcome_memory_mb); "
        "a larger one is answered but not remembered: a duplicate of its id runs again",
    )
    max_deliveries: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="deliveries of one task message without an outcome (RabbitMQ's "
        "x-delivery-count on the quorum task queues) before it is answered redelivery_limit "
        "and dead-lettered instead of run again",
    )
    max_reply_mb: int = Field(
        default=128,
        gt=0,
        le=512,
        description="largest reply sent; a larger result is answered too_large (RabbitMQ "
        "closes the channel on a message over its max_message_size: keep this at or under it)",
    )
    refused_reply_retry_s: float = Field(
        default=10.0,
        ge=0,
        le=300,
        description="how long a reply its queue refuses (a nack) is sent again before it is "
        "dead-lettered reply_undeliverable (a quorum queue electing a leader nacks for seconds)",
    )
    lease_renew_s: float = Field(
        default=600.0,
        gt=0,
        description="a task held this long is re-queued as a copy and acked (under "
        "RabbitMQ's consumer_timeout)",
    )
    lease_secret: SecretStr | None = Field(
        default=None,
        description="key that seals renewal copies' x-swarm-lease header; the same for every "
        "daemon of a deployment (unset: random per daemon)",
    )
    retry_timeouts: bool = Field(
        default=False, description="retry a run that hit its timeout_s, up to max_retries"
    )
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="on SIGTERM, how long in-flight tasks may finish"
    )
    metrics_port: int = Field(
        default=9464,
        ge=-1,
        le=65535,
        description="port of /metrics (Prometheus), /healthz and /readyz; 0 any free port, -1 none",
    )
    metrics_host: str = Field(default="0.0.0.0", description="address the metrics port binds")
    metrics_interval_s: float = Field(
        default=5.0, gt=0, description="how often the ledger, pool and queue gauges refresh"
    )
    console_host: str = Field(
        default="127.0.0.1",
        description="address `swarm console` binds; any but loopback needs SWARM_CONSOLE_TOKEN",
    )
    console_port: int = Field(
        default=9470, ge=0, le=65535, description="port of `swarm console` (0: any free port)"
    )
    console_token: SecretStr | None = Field(
        default=None,
        description="token `swarm console` asks of every request (a bearer header, or the "
        "login form's cookie); required to bind beyond loopback",
    )
    console_metrics_url: str = Field(
        default="http://127.0.0.1:9464/metrics",
        description="the daemon's /metrics URL that `swarm console` charts",
    )
    console_interval_s: float = Field(
        default=2.0, gt=0, description="how often `swarm console` samples the metrics"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise ValueError(f"{CONFIG_ENV}={config_file}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def effective(self) -> dict[str, Any]:
        """Every setting's value as used, secrets masked (the passwords of the AMQP URLs)."""
        values = self.model_dump(mode="json")
        values["amqp_url"] = redact(self.amqp_url.get_secret_value())
        return values

    def actor_environment(self) -> dict[str, str]:
        """Settings that handlers read, set in every actor's environment whatever its node."""
        return {"SWARM_MODEL_DIR": str(self.model_dir)}

    @model_validator(mode="after")
    def _pools_fit(self) -> "Settings":
        for pool in ("cpu", "gpu", "memory"):
            least, most = getattr(self, f"{pool}_pool_min"), getattr(self, f"{pool}_pool_max")
            if least > most:
                name = f"SWARM_{pool.upper()}_POOL"
                raise ValueError(
                    f"{name}_MIN ({least}) is above {name}_MAX ({most}): a pool cannot keep "
                    "more actors than it may have"
                )
        return self

    @field_validator("amqp_url", mode="before")
    @classmethod
    def _join_urls(cls, value: object) -> object:
        # One string whatever the source: the environment gives "url1,url2", TOML a list.
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, list | tuple):
            value = ",".join(str(part) for part in value)
        if isinstance(value, str) and not split_urls(value):
            raise ValueError("no RabbitMQ URL given")
        return value

    def amqp_nodes(self) -> AmqpNodes:
        """The nodes of AMQP_URL, in the order they are tried (a new rotation per call)."""
        return AmqpNodes(self.amqp_url.get_secret_value(), shuffle=self.amqp_shuffle)

    @field_validator("handler_modules", "gpu_task_types", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def codec_limits(self) -> CodecLimits:
        return CodecLimits(self.max_body_bytes, self.max_depth, self.max_containers)

    def task_defaults(self, task_type: str) -> ResourceVector:
        raw = {
            "training": self.defaults_training,
            "inference": self.defaults_inference,
            "data_processing": self.defaults_data_processing,
        }[task_type]
        return ResourceVector(
            cpus=float(raw.get("cpus", 0.0)),
            gpus=float(raw.get("gpus", 0.0)),
            memory_mb=int(raw.get("memory_mb", 0)),
        )

    def pool_specs(self) -> list[PoolSpec]:
        """All three pools; the daemon starts those that some node of the cluster can hold."""
        common = {
            "max_concurrency": self.actor_max_concurrency,
            "start_timeout_s": self.pool_start_timeout_s,
        }
        return [
            PoolSpec(
                name="cpu",
                min_size=self.cpu_pool_min,
                max_size=self.cpu_pool_max,
                shape=ResourceVector(cpus=self.cpu_actor_cpus),
                **common,  # type: ignore[arg-type]
            ),
            PoolSpec(
                name="gpu",
                min_size=self.gpu_pool_min,
                max_size=self.gpu_pool_max,
                shape=ResourceVector(cpus=self.gpu_actor_cpus, gpus=self.gpu_actor_gpus),
                **common,  # type: ignore[arg-type]
            ),
            PoolSpec(
                name="memory",
                min_size=self.memory_pool_min,
                max_size=self.memory_pool_max,
                shape=ResourceVector(
                    cpus=self.memory_actor_cpus, memory_mb=self.memory_actor_memory_mb
                ),
                # A sliver of the marker resource: any number of memory actors fit on a marked
                # node, and none on an unmarked one.
                custom_resources={self.memory_node_resource: 0.001},
                **common,  # type: ignore[arg-type]
            ),
        ]
