"""Bytes of task and control bodies the daemon holds unsettled, against their limit.

Prefetch bounds held deliveries by count only: 256 of 8 MiB each is 2 GiB per queue. This
bounds them by size as well: once the bodies held reach `limit_bytes` the task consumers are
paused, and they resume when the bodies held fall to half of it (hysteresis, so one settled
task does not toggle the consumers). The deliveries RabbitMQ had already sent when the pause
took effect still arrive and are held: see `Ingress` for the exact bound.
"""

from dataclasses import dataclass


@dataclass
class HeldBytes:
    limit_bytes: int
    held: int = 0
    peak: int = 0  # the high-water mark since start, for /metrics and tests
    over: bool = False  # the task consumers are to be paused
    released_total: int = 0  # bytes of every body settled since start

    def hold(self, size: int) -> bool:
        """Count a body received; True when this crossed the limit (pause now)."""
        self.held += size
        self.peak = max(self.peak, self.held)
        if not self.over and self.held >= self.limit_bytes:
            self.over = True
            return True
        return False

    def release(self, size: int) -> bool:
        """Count a body settled; True when this fell to half the limit (resume now)."""
        self.held -= size
        self.released_total += size
        if self.over and self.held <= self.limit_bytes // 2:
            self.over = False
            return True
        return False
