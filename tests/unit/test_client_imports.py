"""The Python client imports only what the base install has: none of the daemon extra.

A producer installs `swarm-broker` without extras (aio-pika, msgpack, pydantic); importing
the client must not reach Ray, numpy, rich, prometheus-client, typer, pydantic-settings or
structlog (tests/test_client_only_install.py installs it alone and runs a task with it)."""

import json
import logging
import subprocess
import sys

import pytest

from broker.cli import entry as cli_entry
from broker.lazy_logging import LazyLogger

DAEMON_ONLY = (
    "ray",
    "numpy",
    "rich",
    "prometheus_client",
    "typer",
    "pydantic_settings",
    "structlog",
    "uvloop",
    "workers",
)

PROBE = f"""
import json, sys
import broker.producer.client
from broker.producer.client import SwarmClient, SyncSwarmClient
import broker.producer.backfill
print(json.dumps([m for m in {list(DAEMON_ONLY)!r} if m in sys.modules]))
"""


def test_client_imports_nothing_of_the_daemon_extra() -> None:
    """In a fresh interpreter, where every one of them is installed."""
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(probe.stdout) == [], probe.stdout


def test_lazy_logger_falls_back_to_logging_without_structlog(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "structlog", None)  # `import structlog` fails
    log = LazyLogger("swarm.test.lazy")
    with caplog.at_level(logging.DEBUG, logger="swarm.test.lazy"):
        log.warning("client_node_unavailable", node="amqp://rabbit:5672/", attempt=2)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("consumer_failed", consumer_tag="ctag")
    first, second = caplog.records
    assert first.levelno == logging.WARNING
    assert first.getMessage() == "client_node_unavailable node='amqp://rabbit:5672/' attempt=2"
    assert second.levelno == logging.ERROR
    assert second.getMessage() == "consumer_failed consumer_tag='ctag'"
    assert second.exc_info is not None and second.exc_info[0] is ValueError


def test_lazy_logger_uses_structlog_where_installed() -> None:
    from structlog.testing import capture_logs

    log = LazyLogger("swarm.test.lazy.structlog")
    with capture_logs() as logs:
        log.info("client_reconnected", node="amqp://rabbit:5672/")
    assert logs == [
        {"event": "client_reconnected", "node": "amqp://rabbit:5672/", "log_level": "info"}
    ]


def test_swarm_without_the_daemon_extra_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli_entry, "find_spec", lambda name: None if name == "ray" else object())
    with pytest.raises(SystemExit) as exited:
        cli_entry.main()
    message = str(exited.value.code)
    assert "\n" not in message
    assert "ray not installed" in message
    assert "pip install 'swarm-broker[daemon]'" in message
