"""Typed settings, read once from the environment (prefix `SWARM_`) and passed down."""

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.codec import DEFAULT_MAX_BODY_BYTES, CodecLimits
from workers.pool import PoolSpec
from workers.resources import ResourceVector

TASK_DEFAULTS: dict[str, dict[str, float]] = {
    "training": {"cpus": 1.0, "gpus": 0.0, "memory_mb": 0},
    "inference": {"cpus": 0.05, "gpus": 0.0, "memory_mb": 0},
    "data_processing": {"cpus": 1.0, "gpus": 0.0, "memory_mb": 0},
}


class Settings(BaseSettings):
    """Every setting of the daemon, client and CLI. See the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="SWARM_", frozen=True, extra="ignore", populate_by_name=True
    )

    amqp_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@localhost:5672/"),
        validation_alias=AliasChoices("AMQP_URL", "SWARM_AMQP_URL"),
        description="RabbitMQ URL; amqps:// for TLS (cafile, certfile, keyfile as query args)",
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
        default_factory=list, description="comma-separated modules whose handlers to load"
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
    cpu_pool_size: int = Field(default=2, ge=0, description="actors in the CPU pool")
    cpu_actor_cpus: float = Field(default=1.0, ge=0, description="CPUs each CPU actor reserves")
    actor_max_concurrency: int = Field(
        default=64, gt=0, description="tasks one actor runs at once, whatever their size"
    )
    pool_start_timeout_s: float = Field(
        default=60.0, gt=0, description="how long an actor may take to be placed and start"
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
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="on SIGTERM, how long in-flight tasks may finish"
    )

    @field_validator("handler_modules", mode="before")
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
        specs = []
        if self.cpu_pool_size:
            specs.append(
                PoolSpec(
                    name="cpu",
                    size=self.cpu_pool_size,
                    shape=ResourceVector(cpus=self.cpu_actor_cpus),
                    max_concurrency=self.actor_max_concurrency,
                    start_timeout_s=self.pool_start_timeout_s,
                )
            )
        return specs
