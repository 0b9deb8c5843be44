#!/usr/bin/env bash
# Set-up on a fresh machine: a virtualenv with Swarm and its test tools, and a running RabbitMQ.
# Idempotent; sourced by run.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.swarm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[daemon,test,fast]'
  touch "$stamp"
fi

# docker-compose checks docker-compose.yml (tests/test_compose.py; no Docker engine needed).
# Best effort: without it that test is skipped.
if ! command -v docker-compose >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing docker-compose (apt-get)" >&2
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose; }
  { apt_install || { apt-get update -qq && apt_install; }; } >/dev/null 2>&1 \
    || echo "docker-compose not installed: tests/test_compose.py will be skipped" >&2
fi

# promtool (Debian's prometheus package) checks and unit-tests deploy/prometheus/alerts.yml
# (tests/test_alerting.py). Best effort: without it those tests are skipped.
if ! command -v promtool >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing promtool (apt-get: prometheus)" >&2
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; }
  { apt_install || { apt-get update -qq && apt_install; }; } >/dev/null 2>&1 \
    || echo "promtool not installed: tests/test_alerting.py's promtool tests will be skipped" >&2
fi

# chromium (Debian's) is the browser tests/test_console.py drives headless through Playwright.
# Best effort: without it that test is skipped (under CI it fails).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing chromium (apt-get)" >&2
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
  { apt_install || { apt-get update -qq && apt_install; }; } >/dev/null 2>&1 \
    || echo "chromium not installed: tests/test_console.py's browser tests will be skipped" >&2
fi

amqp_up() {
  .venv/bin/python - <<'PY'
import asyncio, os, sys
import aio_pika
async def probe():
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/")
    connection = await asyncio.wait_for(aio_pika.connect(url), 5)
    await connection.close()
try:
    asyncio.run(probe())
except Exception:
    sys.exit(1)
PY
}

if ! amqp_up; then
  if [ -z "${AMQP_URL:-}" ] && command -v rabbitmq-server >/dev/null; then
    echo "starting RabbitMQ (rabbitmq-server -detached)" >&2
    rabbitmq-server -detached
    for _ in $(seq 1 60); do amqp_up && break; sleep 1; done
  fi
  amqp_up || { echo "RabbitMQ is not reachable: start it, or set AMQP_URL" >&2; exit 1; }
fi
