"""Figures of the hardening suite: what each hostile case did, printed one line per case.

Every case reports sent / answered / lost / duplicated / dead letters / peak RSS and whether
the daemon was ready afterwards, and asserts on them with `Figures.check`: nothing lost, no
duplicate beyond what the README's Guarantees allow, the daemon ready.
"""

import os
from dataclasses import asdict, dataclass

# Every line reported in this run, printed again together at the end (tests/conftest.py).
REPORTED: list[str] = []


def rss_mb(pid: int | None = None) -> float:
    """Resident memory now (VmRSS) of a process, this one by default."""
    return _status_kb(pid, "VmRSS") / 1024.0


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak resident memory (VmHWM) of a process, this one by default."""
    return _status_kb(pid, "VmHWM") / 1024.0


def _status_kb(pid: int | None, field: str) -> int:
    with open(f"/proc/{pid or os.getpid()}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


@dataclass
class Figures:
    case: str
    sent: int
    answered: int
    lost: int
    duplicated: int = 0
    dead_letters: int = 0
    peak_rss_mb: float = 0.0
    ready: bool = True

    def report(self) -> "Figures":
        values = " ".join(
            f"{key}={value:.0f}" if isinstance(value, float) else f"{key}={value}"
            for key, value in asdict(self).items()
            if key != "case"
        )
        line = f"hardening case={self.case} {values}"
        print(line)
        REPORTED.append(line)
        return self

    def check(self, *, duplicates_allowed: int = 0, dead_letters: int | None = None) -> None:
        """Report, then assert: nothing lost, duplicates within what is allowed, ready."""
        self.report()
        assert self.lost == 0, self
        assert self.duplicated <= duplicates_allowed, self
        assert self.ready, self
        if dead_letters is not None:
            assert self.dead_letters == dead_letters, self
