"""Loggers for the modules a producer imports (the Python client and what it pulls in).

structlog comes with the daemon extra, not with the client install. A `LazyLogger` imports
nothing until its first line: then structlog's logger where structlog is installed (the same
lines, the same configuration as before), the standard `logging` module otherwise, with the
event name first and its fields as `key=value`. Importing this module imports neither.
"""

import logging
from typing import Any

__all__ = ["LazyLogger"]


class _StdlibLogger:
    """structlog's call shape (`log.info("event", key=value)`) over a `logging.Logger`."""

    __slots__ = ("_logger",)

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if not self._logger.isEnabledFor(level):
            return
        exc_info = fields.pop("exc_info", None)
        text = " ".join([event, *(f"{key}={value!r}" for key, value in fields.items())])
        self._logger.log(level, "%s", text, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        fields.setdefault("exc_info", True)
        self._log(logging.ERROR, event, fields)


class LazyLogger:
    """A logger named `name`, resolved on its first line (see the module's docstring)."""

    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def _resolved(self) -> Any:
        if self._logger is None:
            try:
                import structlog
            except ModuleNotFoundError:
                self._logger = _StdlibLogger(self._name)
            else:
                self._logger = structlog.get_logger(self._name)
        return self._logger

    def debug(self, event: str, **fields: Any) -> None:
        self._resolved().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._resolved().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._resolved().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._resolved().error(event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._resolved().exception(event, **fields)
