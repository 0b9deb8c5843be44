"""A resource vector: the arithmetic of CPUs, GPUs and memory shared by pools and the ledger."""

from dataclasses import dataclass

# Float sums of fractional CPUs drift (0.1 + 0.2 > 0.3); compare with this slack.
EPSILON = 1e-9


@dataclass(frozen=True)
class ResourceVector:
    cpus: float = 0.0
    gpus: float = 0.0
    memory_mb: int = 0

    def __add__(self, other: "ResourceVector") -> "ResourceVector":
        return ResourceVector(
            self.cpus + other.cpus, self.gpus + other.gpus, self.memory_mb + other.memory_mb
        )

    def __sub__(self, other: "ResourceVector") -> "ResourceVector":
        return ResourceVector(
            self.cpus - other.cpus, self.gpus - other.gpus, self.memory_mb - other.memory_mb
        )

    def shared_by(self, parts: int) -> "ResourceVector":
        """One of `parts` equal shares: what one run of a batch of `parts` uses."""
        return ResourceVector(self.cpus / parts, self.gpus / parts, self.memory_mb // parts)

    def fits_in(self, capacity: "ResourceVector") -> bool:
        return (
            self.cpus <= capacity.cpus + EPSILON
            and self.gpus <= capacity.gpus + EPSILON
            and self.memory_mb <= capacity.memory_mb
        )

    def as_dict(self) -> dict[str, float | int]:
        return {"cpus": self.cpus, "gpus": self.gpus, "memory_mb": self.memory_mb}


ZERO = ResourceVector()
