"""Celery and Dramatiq as systems of the bench (optional: only when importable).

The same no-op (return the argument) through each, on the same RabbitMQ, driven by the same
client (bench/client.py) with their own message formats: Celery's task protocol v2 (JSON),
Dramatiq's JSON message. The argument is the payload's args as a string of the same length
(JSON has no bytes). Their workers run from bench/ (celery_app.py, dramatiq_app.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from client import BenchError, Codec, LoadClient, args_for
from procs import RssSampler, descendants, scan
from systems import READY_TIMEOUT_S, System, bench_env

HERE = Path(__file__).resolve().parent
JSON = "application/json"


def _text(args: bytes) -> str:
    return args.decode("latin-1")


def _celery_make(task_id: str, args: bytes, reply_to: str) -> tuple[bytes, dict[str, Any]]:
    body = [[_text(args)], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    headers = {
        "lang": "py",
        "task": "bench.noop",
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": "bench",
        "ignore_result": False,
    }
    properties = {"content_type": JSON, "content_encoding": "utf-8", "headers": headers}
    return json.dumps(body).encode(), properties


def _celery_check(reply: bytes, sent: bytes, args: bytes) -> str | None:
    answer = json.loads(reply)
    if answer.get("status") != "SUCCESS":
        return f"celery answered {answer.get('status')}: {answer.get('result')}"
    return None if answer.get("result") == _text(args) else "celery's result differs"


def _dramatiq_make(task_id: str, args: bytes, reply_to: str) -> tuple[bytes, dict[str, Any]]:
    body = {
        "queue_name": "bench.dramatiq",
        "actor_name": "noop",
        "args": [_text(args)],
        "kwargs": {},
        "options": {"reply_to": reply_to, "correlation_id": task_id},
        "message_id": task_id,
        "message_timestamp": int(time.time() * 1000),
    }
    return json.dumps(body).encode(), {"content_type": JSON}


def _dramatiq_check(reply: bytes, sent: bytes, args: bytes) -> str | None:
    answer = json.loads(reply)
    if not answer.get("ok"):
        return f"dramatiq's actor failed: {answer.get('error')}"
    return None if answer.get("result") == _text(args) else "dramatiq's result differs"


CELERY = Codec("celery", "", "bench.celery", _celery_make, _celery_check)
DRAMATIQ = Codec("dramatiq", "", "bench.dramatiq", _dramatiq_make, _dramatiq_check)


class Worker(System):
    """A worker process whose readiness is its first answered task."""

    command: list[str]

    def _env(self, url: str) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
        return bench_env(BENCH_AMQP_URL=url, PYTHONPATH=path, PYTHONUNBUFFERED="1")

    async def start(self, url: str) -> None:
        self._spawn(self.command, self._env(url))

    async def wait_ready(self, client: LoadClient) -> float:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                await client.run(1, 1, args_for("small"), timeout_s=5.0)
                return time.monotonic() - self.started_at
            except BenchError:
                await asyncio.sleep(0.3)  # its queue is not declared yet, or it is starting
        raise BenchError(f"{self.name} did not answer within {READY_TIMEOUT_S:g} s")

    def sampler(self) -> RssSampler:
        pid = self.pid
        return RssSampler(pid, lambda: descendants(pid, scan()))


class CeleryWorker(Worker):
    name = "celery"
    codec = CELERY
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "celery_app",
        "worker",
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


class DramatiqWorker(Worker):
    name = "dramatiq"
    codec = DRAMATIQ
    command = [
        sys.executable,
        "-m",
        "dramatiq",
        "dramatiq_app",
        "--processes",
        "1",
        "--threads",
        "8",
    ]

    def _env(self, url: str) -> dict[str, str]:
        env = super()._env(url)
        env["dramatiq_queue_prefetch"] = "256"
        return env


def make(name: str, log_dir: Path, tag: str) -> System:
    return CeleryWorker(log_dir, tag) if name == "celery" else DramatiqWorker(log_dir, tag)
