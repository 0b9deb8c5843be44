"""Control signals a handler raises on purpose; not errors, and not logged as such."""


class Retry(Exception):
    """Ask the daemon to run the task again after `delay_s` (counts against `max_retries`)."""

    def __init__(self, delay_s: float = 0.0, reason: str = "") -> None:
        super().__init__(reason or f"retry in {delay_s:g} s")
        self.delay_s = max(0.0, float(delay_s))
        self.reason = reason
