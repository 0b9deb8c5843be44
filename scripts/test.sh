#!/usr/bin/env bash
# Lint, type-check and run the whole test suite against the real RabbitMQ and Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check broker workers schemas
.venv/bin/mypy
.venv/bin/python -m pytest -p no:cacheprovider "$@"
